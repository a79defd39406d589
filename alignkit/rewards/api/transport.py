"""One POST to the judge over aiohttp: keep-alive connection pool, total timeout, capped reply body.

Everything that goes wrong on the wire becomes a ``RequestFailure`` with a kind
(``connection error``, ``timeout``, ``oversize body``) and whether a retry can help; what the
reply *says* is judged by the caller (``ApiReward._interpret``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import aiohttp


@dataclass
class RequestFailure(Exception):
    """One failed attempt: every item of the request gets ``reason`` if it is the last one."""

    kind: str
    detail: str
    retryable: bool = False
    retry_after: float | None = None  # seconds, from the server's Retry-After

    @property
    def reason(self) -> str:
        return f"{self.kind}: {self.detail}"


@dataclass
class Reply:
    status: int
    content: bytes
    retry_after: str | None  # the Retry-After header, as sent


def is_http_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def check_url(url: str, key: str = "reward_api.url") -> None:
    """Raise ``ValueError`` now, not mid-run, if ``url`` (the value of ``key``) is not an http(s) URL."""
    if not is_http_url(url):
        raise ValueError(f"{key} must be an http(s) URL such as http://127.0.0.1:8000/score, got {url!r}")


def open_session(max_concurrency: int, timeout_s: float, headers: dict[str, str]) -> aiohttp.ClientSession:
    """A session with at most ``max_concurrency`` kept-alive connections; call it on the loop that uses it.

    The caller bounds requests in flight to the same number (a semaphore), so a request never
    waits for a connection inside aiohttp, where the wait would count against ``timeout_s``.
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max_concurrency, limit_per_host=max_concurrency),
        timeout=aiohttp.ClientTimeout(total=timeout_s),  # connect, send, wait and read the body
        headers={
            "User-Agent": "alignkit",
            "Accept": "application/json",
            "Content-Type": "application/json",
            **headers,
        },
        cookie_jar=aiohttp.DummyCookieJar(),  # a judge API has no use for cookies
    )


async def post(session: aiohttp.ClientSession, url: str, body: bytes, max_body_bytes: int) -> Reply:
    """POST ``body`` to ``url``; raise ``RequestFailure`` if no complete reply of at most ``max_body_bytes`` came."""
    try:
        try:
            return await _post_once(session, url, body, max_body_bytes)
        except aiohttp.ServerDisconnectedError:
            # The judge closed an idle keep-alive connection just as it was reused. aiohttp
            # re-sends only idempotent methods on a fresh connection (RFC 9112 section 9.3.1);
            # scoring is idempotent, so do the same, once. This is not a retry.
            return await _post_once(session, url, body, max_body_bytes)
    except asyncio.TimeoutError:  # aiohttp's ServerTimeoutError is one
        total = session.timeout.total
        raise RequestFailure("timeout", f"no reply within {total:g} s", retryable=True) from None
    except aiohttp.ClientError as e:  # refused, reset, closed mid-reply, not HTTP
        raise RequestFailure("connection error", f"{e or type(e).__name__} ({url})", retryable=True) from None


async def _post_once(session: aiohttp.ClientSession, url: str, body: bytes, cap: int) -> Reply:
    # A 3xx reply is a failure that names it: following a 302 would turn the POST into a GET.
    async with session.post(url, data=body, allow_redirects=False) as resp:
        if resp.content_length is not None and resp.content_length > cap:
            raise RequestFailure(
                "oversize body", f"reply declares {resp.content_length} bytes > max_body_bytes={cap}"
            )
        chunks, size = [], 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if size > cap:  # stop reading (the connection is dropped): a runaway reply must not fill memory
                raise RequestFailure("oversize body", f"reply exceeds max_body_bytes={cap}")
            chunks.append(chunk)
        return Reply(resp.status, b"".join(chunks), resp.headers.get("Retry-After"))


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
