"""A small judge server (FastAPI + uvicorn) speaking every request shape alignkit's client sends.

For development, tests, the demo and benchmarks: it scores with a rule, a user Python function
or (through the ``scorer`` hook) a trained reward model, and injects faults on request so a
client can be tested against real HTTP misbehaviour. Bound to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import random
import re
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict

from alignkit.judge.llm import add_llm_args, serve_llm
from alignkit.rewards.api.criteria import listed_criteria
from alignkit.rewards.rules import Scorer, load_rule, rule_scorer

FAULT_KINDS = (
    "500",
    "timeout",
    "malformed",
    "wrong_count",
    "429",
    "nan",
    "non_numeric",
    "oversize",
    "unsuccessful",
)
DEFAULT_FAULT_KINDS = ("500", "timeout", "malformed", "wrong_count", "429")

# Where each preset's requests go on this server (the client's reward_api.url is base + path).
PATHS = {
    "alignkit": "/score",
    "llamafactory": "/llamafactory",
    "openrlhf": "/get_reward",
    "openai_judge": "/v1/chat/completions",
    "custom": "/custom/evaluate",
}

# The default openai_judge rubric lays the sample out in these sections (see rewards/api/presets.py).
_RUBRIC_SECTIONS = re.compile(
    r"\[Prompt\]\n(.*?)\n\n\[Response\]\n(.*?)\n\n\[Reference answer\]\n(.*?)\n\nGive ", re.DOTALL
)

# ... and the listwise rubric (judge_mode: listwise) lists a group's responses as [R1], [R2], ...
_LISTWISE_SECTIONS = re.compile(
    r"\[Prompt\]\n(.*?)\n\n\[Reference answer\]\n(.*?)\n\n\[Responses\]\n(.*?)\n\nReply with a JSON", re.DOTALL
)
# ... and the pairwise rubric (judge_mode: pairwise) shows two responses, A then B.
_PAIRWISE_SECTIONS = re.compile(
    r"\[Prompt\]\n(.*?)\n\n\[Reference answer\]\n(.*?)\n\n\[Response A\]\n(.*?)\n\n\[Response B\]\n(.*?)"
    r"\n\nReply with a JSON", re.DOTALL
)
# ... and the criteria rubric (reward_api.criteria) lists the criteria to score.
_CRITERIA_SECTIONS = re.compile(
    r"\[Prompt\]\n(.*?)\n\n\[Response\]\n(.*?)\n\n\[Reference answer\]\n(.*?)\n\n\[Criteria\]\n(.*?)\n\nReply with",
    re.DOTALL,
)
_LISTED = re.compile(r"\[R\d+\]\n(.*?)(?=\n\n\[R\d+\]\n|\Z)", re.DOTALL)

Shape = Callable[[list[Any]], Any]  # scores -> the JSON body of one request shape


@dataclass
class JudgeSettings:
    """Knobs for testing clients; mutable while the server runs (tests change them between calls)."""

    latency_ms: float = 0.0  # added to every request
    fault_rate: float = 0.0  # probability that a request gets a fault
    fault_kinds: tuple[str, ...] = DEFAULT_FAULT_KINDS
    fault_first: int = 0  # the first N requests always fault (cycling through fault_kinds)
    seed: int = 0
    token: str | None = None  # bearer token required when set
    retry_after_s: float = 1.0  # Retry-After sent with an injected 429
    hang_s: float = 30.0  # how long an injected "timeout" holds the reply
    oversize_bytes: int = 2_000_000  # padding added by an injected "oversize"
    prefer_first: bool = False  # pairwise requests: always pick response A (a judge with pure position bias)

    def __post_init__(self) -> None:
        unknown = set(self.fault_kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; choose from {', '.join(FAULT_KINDS)}")


@dataclass
class JudgeStats:
    """Requests and items seen, so tests can check that each sample was scored exactly once."""

    requests: int = 0
    items: int = 0
    pairs: Counter[tuple[str, str]] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    by_path: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0  # requests being handled now
    max_in_flight: int = 0
    images: Counter[str] = field(default_factory=Counter)  # image references received, as sent (data: URLs hashed)
    usage: Counter[str] = field(default_factory=Counter)  # prompt/completion tokens of the usable replies sent
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, path: str, prompts: list[str], responses: list[str]) -> int:
        with self.lock:
            self.requests += 1
            self.items += len(responses)
            self.by_path[path] += 1
            self.pairs.update(zip(prompts, responses, strict=True))
            return self.requests

    def record_images(self, refs: list[str]) -> None:
        """Image references a request carried (paths, URLs); a ``data:`` URL counts by its hash."""
        with self.lock:
            self.images.update(_image_ref(r) for r in refs)

    def snapshot(self, pairs: bool = False) -> dict[str, Any]:
        with self.lock:
            out: dict[str, Any] = {
                "requests": self.requests,
                "items": self.items,
                "distinct_pairs": len(self.pairs),
                "max_per_pair": max(self.pairs.values(), default=0),
                "faults": dict(self.faults),
                "by_path": dict(self.by_path),
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "images": dict(self.images),
                "usage": {k: self.usage[k] for k in ("prompt_tokens", "completion_tokens")},
            }
            if pairs:
                out["pairs"] = [{"prompt": p, "response": r, "count": c} for (p, r), c in self.pairs.items()]
            return out

    def reset(self) -> None:
        with self.lock:
            self.requests = self.items = self.max_in_flight = 0
            self.pairs.clear()
            self.faults.clear()
            self.by_path.clear()
            self.images.clear()
            self.usage.clear()


def _image_ref(ref: str) -> str:
    """``data:image/png;base64,...`` -> ``data:image/png;sha256=<12 hex>``: recorded without the bytes."""
    if not ref.startswith("data:"):
        return ref
    head, _, data = ref.partition(",")
    return f"{head.split(';')[0]};sha256={hashlib.sha256(data.encode()).hexdigest()[:12]}"


class AlignkitItem(BaseModel):
    prompt: str
    response: str
    label: str | None = None
    images: list[str] | None = None  # the prompt's image paths


class AlignkitRequest(BaseModel):
    items: list[AlignkitItem]


class LlamaFactoryRequest(BaseModel):
    model: str = "model"
    messages: list[str]


class OpenRLHFRequest(BaseModel):
    query: list[str]
    prompts: list[str] | None = None
    labels: list[str | None] | None = None


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict[str, Any]]  # text, or OpenAI content parts (text, image_url)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")

    def image_urls(self) -> list[str]:
        if isinstance(self.content, str):
            return []
        return [p.get("image_url", {}).get("url", "") for p in self.content if p.get("type") == "image_url"]


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage]
    temperature: float | None = None


class EvalInput(BaseModel):
    model_config = ConfigDict(extra="allow")
    query: str
    model_answer: str
    reference: str | None = None


class CustomRequest(BaseModel):
    """The internal evaluation-platform shape of ``examples/judge_custom.yaml``."""

    model_config = ConfigDict(extra="allow")
    name: str | None = None
    description: str | None = None
    prompt: dict[str, Any] | None = None
    evalutateModelId: str | None = None  # sic: the platform's spelling
    inputParams: EvalInput | None = None
    batchInputParams: list[EvalInput] | None = None


def create_app(
    scorer: Scorer, settings: JudgeSettings | None = None, *, scorer_in_thread: bool = False
) -> FastAPI:
    """The judge app. ``scorer(prompts, responses, labels) -> scores`` is the scoring hook;
    set ``scorer_in_thread`` for a slow scorer (a reward model) so it does not block the loop."""
    settings = settings or JudgeSettings()
    stats = JudgeStats()
    app = FastAPI(
        title="alignkit judge", description="Scores (prompt, response) pairs; see docs/reward_api.md."
    )
    app.state.settings = settings
    app.state.stats = stats
    # One POST route per preset's request shape (PATHS), all scoring through one judge.
    judge, scoring = _Judge(scorer, settings, stats, scorer_in_thread), [Depends(_bearer_check(settings))]
    _add_reward_model_routes(app, judge, scoring)
    _add_evaluation_routes(app, judge, scoring)
    _add_stats_routes(app, stats, scoring)
    return app


def _bearer_check(settings: JudgeSettings) -> Callable[[Request], Awaitable[None]]:
    """A dependency refusing requests without ``Authorization: Bearer <settings.token>`` (when set)."""

    async def check_token(request: Request) -> None:
        if settings.token is None:
            return
        sent = request.headers.get("authorization", "")
        if not secrets.compare_digest(sent.encode(), f"Bearer {settings.token}".encode()):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token")

    return check_token


class _Judge:
    """Scores one request: counts it, picks its fault (if any), calls the scorer, shapes the reply."""

    def __init__(self, scorer: Scorer, settings: JudgeSettings, stats: JudgeStats, scorer_in_thread: bool):
        self.scorer = scorer
        self.settings = settings
        self.stats = stats
        self.scorer_in_thread = scorer_in_thread
        self.rng = random.Random(settings.seed)

    async def __call__(
        self, path: str, prompts: list[str], responses: list[str], labels: list[str | None], shape: Shape
    ) -> Response:
        stats = self.stats
        fault = self.pick_fault(stats.record(path, prompts, responses))
        with stats.lock:
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
            if fault:
                stats.faults[fault] += 1
        try:
            return await self.answer(fault, prompts, responses, labels, shape)
        finally:
            with stats.lock:
                stats.in_flight -= 1

    def pick_fault(self, n_request: int) -> str | None:
        """The first ``fault_first`` requests cycle through ``fault_kinds``; later ones fault at ``fault_rate``."""
        settings, kinds = self.settings, self.settings.fault_kinds
        if n_request <= settings.fault_first and kinds:
            return kinds[(n_request - 1) % len(kinds)]
        if settings.fault_rate > 0 and kinds and self.rng.random() < settings.fault_rate:
            return self.rng.choice(kinds)
        return None

    async def answer(
        self, fault: str | None, prompts: list[str], responses: list[str], labels: list[str | None], shape: Shape
    ) -> Response:
        """The reply, with ``fault`` injected where a real server would go wrong: before scoring
        (HTTP errors, a hang), in the scores, or in the body."""
        if self.settings.latency_ms:
            await asyncio.sleep(self.settings.latency_ms / 1000)
        if fault == "timeout":
            await asyncio.sleep(self.settings.hang_s)
        elif (error := _error_reply(fault, self.settings)) is not None:
            return error
        try:
            if self.scorer_in_thread:
                raw = await run_in_threadpool(self.scorer, prompts, responses, labels)
            else:
                raw = self.scorer(prompts, responses, labels)
            values: list[Any] = [float(v) for v in raw]  # numpy / torch scalars are not JSON
        except Exception as e:  # the scorer is user code; report, do not crash the server
            return Response(f"scorer raised {type(e).__name__}: {e}", status_code=500)
        body = _spoil_body(fault, shape(_spoil_scores(fault, values)), self.settings)
        if isinstance(body, dict) and isinstance(body.get("usage"), dict) and fault != "oversize":
            with self.stats.lock:  # what a client that read the reply was billed
                self.stats.usage.update({k: body["usage"][k] for k in ("prompt_tokens", "completion_tokens")})
        return Response(json.dumps(body).encode(), media_type="application/json")


def _error_reply(fault: str | None, settings: JudgeSettings) -> Response | None:
    """The reply of a fault that answers without scoring, or None."""
    if fault == "500":
        return Response("injected fault: internal server error", status_code=500)
    if fault == "429":
        return Response(
            "injected fault: too many requests",
            status_code=429,
            headers={"Retry-After": f"{settings.retry_after_s:g}"},
        )
    if fault == "malformed":
        return Response(b'{"scores": [1.0, ', media_type="application/json")
    return None


def _spoil_scores(fault: str | None, values: list[Any]) -> list[Any]:
    """Scores as a fault in the scores leaves them (one too few or many, NaN, not a number)."""
    if fault == "wrong_count":
        return values[:-1] if len(values) > 1 else values * 2
    if fault == "nan" and values:
        values[0] = math.nan
    elif fault == "non_numeric" and values:
        values[0] = "n/a"
    return values


def _spoil_body(fault: str | None, body: Any, settings: JudgeSettings) -> Any:
    """The JSON body as a fault in the body leaves it (padded past size limits, or a failure envelope)."""
    if fault == "oversize":
        body["padding"] = "x" * settings.oversize_bytes
    elif fault == "unsuccessful":
        body = {
            "success": False,
            "code": 503,
            "message": "injected fault: evaluation failed",
            "data": None,
        }
    return body


def _add_reward_model_routes(app: FastAPI, judge: _Judge, scoring: list[Any]) -> None:
    """Remote reward-model shapes: a batch of texts in, a list of scores out."""

    @app.post(PATHS["alignkit"], dependencies=scoring, summary="alignkit shape: items -> scores")
    async def score_alignkit(req: AlignkitRequest) -> Response:
        items = req.items
        judge.stats.record_images([i for it in items for i in it.images or []])
        return await judge(
            PATHS["alignkit"],
            [it.prompt for it in items],
            [it.response for it in items],
            [it.label for it in items],
            lambda v: {"scores": v},
        )

    @app.post(PATHS["llamafactory"], dependencies=scoring, summary="LLaMA-Factory shape: messages -> scores")
    async def score_llamafactory(req: LlamaFactoryRequest) -> Response:
        # The text is prompt+response already joined; the scorer sees it all as the response.
        n = len(req.messages)
        return await judge(PATHS["llamafactory"], [""] * n, req.messages, [None] * n, lambda v: {"scores": v})

    @app.post(PATHS["openrlhf"], dependencies=scoring, summary="OpenRLHF remote RM: query -> rewards")
    async def score_openrlhf(req: OpenRLHFRequest) -> Response:
        n = len(req.query)
        prompts = req.prompts if req.prompts and len(req.prompts) == n else [""] * n
        responses = [q[len(p) :] if q.startswith(p) else q for q, p in zip(req.query, prompts, strict=True)]
        labels = req.labels if req.labels and len(req.labels) == n else [None] * n
        lengths = [float(len(r)) for r in responses]
        return await judge(
            PATHS["openrlhf"],
            prompts,
            responses,
            labels,
            lambda v: {"rewards": v, "scores": v, "extra_logs": {"response_chars": lengths}},
        )



def _add_evaluation_routes(app: FastAPI, judge: _Judge, scoring: list[Any]) -> None:
    """LLM-judge and evaluation-platform shapes: the score wrapped in the service's own envelope."""

    @app.post(PATHS["openai_judge"], dependencies=scoring, summary="OpenAI chat completion judging a rubric")
    async def chat_completions(req: ChatRequest) -> Response:
        content = req.messages[-1].text() if req.messages else ""
        judge.stats.record_images([u for m in req.messages for u in m.image_urls()])
        kind = "point"
        if lw := _LISTWISE_SECTIONS.search(content):  # a group in one request: one score per [Rn]
            prompt, label, listed = lw.groups()
            responses, kind = _LISTED.findall(listed), "list"
        elif cr := _CRITERIA_SECTIONS.search(content):  # every criterion gets the rule's score
            prompt, response, label, listed = cr.groups()
            responses, kind = [response], "criteria:" + ",".join(listed_criteria(listed))
        elif pw := _PAIRWISE_SECTIONS.search(content):  # two responses: the reply names the better one
            prompt, label, a, b = pw.groups()
            responses, kind = [a, b], "pair"
        else:
            m = _RUBRIC_SECTIONS.search(content)
            prompt, response, label = m.groups() if m else ("", content, "")
            responses = [response]

        def shape(values: list[Any]) -> dict[str, Any]:
            if kind == "pair" and len(values) == 2:
                values = ["A" if judge.settings.prefer_first or values[0] > values[1]
                          else "B" if values[1] > values[0] else "tie"]
            return chat_reply(req, content, values, judge.stats.requests, kind)

        n = len(responses)
        return await judge(PATHS["openai_judge"], [prompt] * n, responses, [label or None] * n, shape)

    @app.post(PATHS["custom"], dependencies=scoring, summary="Internal evaluation-platform shape")
    async def evaluate(req: CustomRequest) -> Response:
        if req.batchInputParams is not None:
            inputs, batched = req.batchInputParams, True
        elif req.inputParams is not None:
            inputs, batched = [req.inputParams], False
        else:
            raise HTTPException(status_code=422, detail="send inputParams or batchInputParams")
        judge.stats.record_images([i for x in inputs for i in (x.model_extra or {}).get("images") or []])

        def shape(values: list[Any]) -> dict[str, Any]:
            data = values if batched else (values[0] if len(values) == 1 else values)
            return {"success": True, "code": 0, "message": "ok", "data": data}

        return await judge(
            PATHS["custom"],
            [x.query for x in inputs],
            [x.model_answer for x in inputs],
            [x.reference for x in inputs],
            shape,
        )


def chat_reply(req: ChatRequest, prompt_text: str, values: list[Any], n_request: int,
               kind: str = "point") -> dict[str, Any]:
    """An OpenAI chat completion holding the rule's score: as text, as ``{"score": N}`` when the request
    asked for a JSON ``response_format``, with ``top_logprobs`` around the score when it asked for logprobs
    (60% on the rounded score, 20% on each neighbour), ``n`` identical choices, and a ``usage`` that
    counts whitespace-separated words as tokens (what ``/stats`` sums). A listwise request (``kind``
    ``list``) gets ``{"R1": N, ...}``, one score per listed response; a pairwise one (``pair``)
    ``{"winner": "A" | "B" | "tie"}``."""
    extra = req.model_extra or {}
    wants_json = isinstance(extra.get("response_format"), dict) and extra["response_format"].get("type") in (
        "json_schema", "json_object")
    if kind == "list":
        text = json.dumps({f"R{i}": v for i, v in enumerate(values, 1)})
    elif kind == "pair":
        text = json.dumps({"winner": values[0]})
    elif kind.startswith("criteria:") and len(values) == 1:
        text = json.dumps(dict.fromkeys(kind.removeprefix("criteria:").split(","), values[0]))
    elif len(values) != 1:
        text = "I cannot decide."
    elif wants_json:
        text = json.dumps({"score": values[0]})
    else:
        text = f"The response was checked. Score: {values[0]}"
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if extra.get("logprobs") and len(values) == 1 and isinstance(values[0], float) and math.isfinite(values[0]):
        choice["logprobs"] = {"content": _score_logprobs(values[0])}
    n = extra.get("n") if isinstance(extra.get("n"), int) and extra.get("n", 1) > 0 else 1
    completion = len(text.split()) * n
    return {
        "id": f"chatcmpl-{n_request}", "object": "chat.completion", "created": int(time.time()), "model": req.model,
        "choices": [choice | {"index": i} for i in range(n)],
        "usage": {"prompt_tokens": len(prompt_text.split()), "completion_tokens": completion,
                  "total_tokens": len(prompt_text.split()) + completion},
    }


def _score_logprobs(value: float) -> list[dict[str, Any]]:
    """Log-probs of a reply whose one token is the score: most mass on it, some on each neighbour."""
    best = int(round(value))
    top = [{"token": str(best), "logprob": math.log(0.6)}] + [
        {"token": str(v), "logprob": math.log(0.2)} for v in (best - 1, best + 1)]
    return [{"token": str(best), "logprob": math.log(0.6), "top_logprobs": top}]


def _add_stats_routes(app: FastAPI, stats: JudgeStats, scoring: list[Any]) -> None:
    """``/stats`` and its reset (behind the token, like scoring) and the ``/health`` probe."""

    @app.get("/stats", dependencies=scoring, summary="Requests, items and per-pair counts seen")
    async def get_stats(pairs: bool = False) -> dict[str, Any]:
        return stats.snapshot(pairs)

    @app.post("/stats/reset", dependencies=scoring, summary="Zero the counters")
    async def reset_stats() -> dict[str, Any]:
        stats.reset()
        return {"ok": True}

    @app.get("/health", summary="Liveness probe (no auth)")
    async def health() -> dict[str, Any]:
        return {"ok": True}


def make_scorer(rule: str = "count_good") -> Scorer:
    """A batch scorer from a built-in rule name, ``module:NAME`` or ``file.py:function``."""
    return rule_scorer(load_rule(rule))


class JudgeServer:
    """A judge server running on a background thread; ``url`` is its base URL."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.app = app
        self.settings: JudgeSettings = app.state.settings
        self.stats: JudgeStats = app.state.stats
        # Bind first so port 0 picks a free port we can report before serving starts.
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=1
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def url_for(self, preset: str) -> str:
        """The full URL a client with ``reward_api.preset: <preset>`` should POST to."""
        return self.url + PATHS[preset]

    def start(self, timeout_s: float = 10.0) -> JudgeServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"judge server did not start on {self.url} within {timeout_s} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving: open connections are dropped, new ones are refused."""
        self._server.should_exit = True
        self._server.force_exit = True
        self._thread.join(timeout_s)
        self._sock.close()

    def __enter__(self) -> JudgeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_judge_server(
    scorer: Scorer | None = None,
    *,
    rule: str = "count_good",
    host: str = "127.0.0.1",
    port: int = 0,
    scorer_in_thread: bool = False,
    **knobs: Any,
) -> JudgeServer:
    """Start a judge on a background thread (port 0: a free port); ``knobs`` are ``JudgeSettings``.

    Example::

        server = start_judge_server(latency_ms=5)
        url = server.url_for("alignkit")  # http://127.0.0.1:PORT/score
        server.stop()
    """
    app = create_app(scorer or make_scorer(rule), JudgeSettings(**knobs), scorer_in_thread=scorer_in_thread)
    return JudgeServer(app, host, port).start()


def add_judge_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``judge serve`` to the CLI's subparsers; the parsed args go to ``judge_main``."""
    judge = subparsers.add_parser("judge", help="run a local judge server")
    sub = judge.add_subparsers(dest="judge_command", required=True)
    serve = sub.add_parser("serve", help="serve the judge API shapes over HTTP, or (--llm) a real LLM judge")
    _add_serve_args(serve)
    add_llm_args(serve)
    return judge


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument(
        "--rule", default="count_good", help="built-in rule, module:NAME, or path/to/file.py:function"
    )
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay added to every request, milliseconds")
    p.add_argument("--fault-rate", type=float, default=0.0, help="probability of a fault per request (0-1)")
    p.add_argument(
        "--fault-kinds",
        default=",".join(DEFAULT_FAULT_KINDS),
        help=f"comma-separated faults to inject, from: {', '.join(FAULT_KINDS)}",
    )
    p.add_argument(
        "--retry-after-s", type=float, default=1.0, help="Retry-After sent with an injected 429, seconds"
    )
    p.add_argument(
        "--hang-s", type=float, default=30.0, help="how long an injected timeout holds a reply, seconds"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the fault injection")
    p.add_argument(
        "--token",
        default=os.environ.get("ALIGNKIT_JUDGE_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' (default: $ALIGNKIT_JUDGE_TOKEN if set)",
    )


def judge_main(args: argparse.Namespace, scorer: Scorer | None = None) -> None:
    """Serve in the foreground until interrupted; with ``--llm``, vLLM's OpenAI server on that model."""
    if getattr(args, "llm", None):
        serve_llm(args)
        return
    settings = JudgeSettings(
        latency_ms=args.latency_ms,
        fault_rate=args.fault_rate,
        fault_kinds=tuple(k.strip() for k in args.fault_kinds.split(",") if k.strip()),
        seed=args.seed,
        token=args.token,
        retry_after_s=args.retry_after_s,
        hang_s=args.hang_s,
    )
    app = create_app(scorer or make_scorer(args.rule), settings)
    print(f"alignkit judge on http://{args.host}:{args.port} (paths: {PATHS}; OpenAPI at /openapi.json)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m alignkit.judge.server", description="alignkit judge server"
    )
    _add_serve_args(parser)
    judge_main(parser.parse_args(argv))


if __name__ == "__main__":
    main()
