"""Logging set-up: JSON lines or text, and a filter that keeps tokens out of every record."""

from __future__ import annotations

import logging
import re
import sys
import time

import orjson

# A JWT: three base64url parts, the first one starting like every JSON header does ("{"...).
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")
_TOKEN_PARAM = re.compile(r"(token=)[^&\s\"']+")


def redact(text: str) -> str:
    return _TOKEN_PARAM.sub(r"\1[redacted]", _JWT.sub("[redacted-jwt]", text))


class _Redact(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        for key, value in list(vars(record).items()):
            if key.startswith("ctx_") and isinstance(value, str):
                setattr(record, key, redact(value))
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k[4:]: v for k, v in vars(record).items() if k.startswith("ctx_")})
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(entry, default=str).decode()


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = " ".join(f"{k[4:]}={v}" for k, v in vars(record).items() if k.startswith("ctx_"))
        return f"{text} {extra}" if extra else text


def configure(level: str, fmt: str) -> None:
    """Send fluxrt's logs to stderr at `level`, as JSON lines (`json`) or human-readable text (`text`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Redact())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("fluxrt")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def ctx(**fields: object) -> dict[str, object]:
    """Structured fields for a log call: `log.info("closed", extra=ctx(conn=..., code=...))`."""
    return {f"ctx_{k}": v for k, v in fields.items()}
