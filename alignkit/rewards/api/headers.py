"""Secrets in ``reward_api.headers``: ``${ENV_VAR}`` substitution and redaction.

Configs hold templates (``Authorization: Bearer ${JUDGE_API_KEY}``); the secret value exists
only in the client's request headers. Anything shown to a person (logs, errors, saved
configs) goes through ``redact_headers`` or ``scrub``.
"""

from __future__ import annotations

import logging
import os
import re

from alignkit.config import ENV_VAR

logger = logging.getLogger(__name__)

REDACTED = "***"
_SENSITIVE_HEADER = re.compile(r"auth|token|key|secret|cookie|password|signature", re.IGNORECASE)


def redact_headers(headers: dict[str, str]) -> dict[str, str]:
    """``${ENV}`` templates are shown as written; other values of secret-looking headers are masked."""
    return {
        k: v if ENV_VAR.search(v) or not _SENSITIVE_HEADER.search(k) else REDACTED
        for k, v in headers.items()
    }


def check_env(headers: dict[str, str]) -> None:
    """Raise ``ValueError`` naming every ``${VAR}`` the headers use that the environment lacks."""
    missing = [f"reward_api.headers.{name} uses ${{{var}}}" for name, template in headers.items()
               for var in ENV_VAR.findall(template) if var not in os.environ]
    if missing:
        names = sorted({m.rsplit("${", 1)[1].rstrip("}") for m in missing})
        raise ValueError(f"{'; '.join(missing)} but {', '.join(names)} is not set in the environment: "
                         f"export {names[0]}=... before starting (the config keeps the ${{VAR}} template, never the value)")


def resolve_headers(headers: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Substitute ``${ENV_VAR}``; return the headers and the secret strings to scrub from any text.

    Raises ``KeyError`` with a message naming the header and the missing variable.
    """
    resolved: dict[str, str] = {}
    secrets: list[str] = []
    for name, template in headers.items():
        for var in ENV_VAR.findall(template):
            if var not in os.environ:
                raise KeyError(
                    f"reward_api.headers.{name} uses ${{{var}}} but the environment variable {var} is not set"
                )
            if os.environ[var]:
                secrets.append(os.environ[var])
        resolved[name] = ENV_VAR.sub(lambda m: os.environ[m.group(1)], template)
        if _SENSITIVE_HEADER.search(name) and not ENV_VAR.search(template):
            logger.warning("reward_api.headers.%s holds a literal value; prefer ${ENV_VAR}", name)
            secrets.append(template)
    # Longest first, so a secret that contains another is replaced whole.
    return resolved, sorted(secrets, key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` with every secret value replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text
