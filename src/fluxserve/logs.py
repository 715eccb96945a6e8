"""Structured logs: key=value lines for people, or one JSON object a line for collectors.

Every line passes :func:`redact` first, whoever wrote it (ours, uvicorn's access log, a traceback): the
values of query strings (``?jobId=[redacted]&signature=[redacted]``: signed result URLs stay valid for a
week) and the user info of URLs (``https://[redacted]@host/``) never reach a log.
"""

from __future__ import annotations

import logging
import re
from collections.abc import MutableMapping
from typing import Any

import structlog

REDACTED = "[redacted]"
# user info in a URL: "scheme://user:pass@" (the last "@" before the path, as parsers read it)
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s\"'<>]*@")
# a query string: a "?" not after whitespace, up to whitespace, a quote or a fragment
_QUERY = re.compile(r"(?<![\s?])\?([^\s\"'<>#]+)")
# a signature-like parameter anywhere (a query cut from its URL, a form body)
_SECRET_PARAM = re.compile(r"(?i)\b(signature|sig|token|secret|key|x-key|password)=([^&\s\"'<>#]+)")


def _redact_query(match: re.Match[str]) -> str:
    pairs = match.group(1).split("&")
    return "?" + "&".join(
        f"{pair.split('=', 1)[0]}={REDACTED}" if "=" in pair else (REDACTED if pair else pair)
        for pair in pairs
    )


def redact_text(text: str) -> str:
    """``text`` with URL user info, query values and signature-like parameters replaced."""
    if "?" not in text and "@" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda match: f"{match.group(1)}{REDACTED}@", text)
    text = _QUERY.sub(_redact_query, text)
    return _SECRET_PARAM.sub(lambda match: f"{match.group(1)}={REDACTED}", text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: _redact_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(item) for item in value)
    return value


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor: every string in the event (message, fields, exception text) redacted."""
    for key, value in event_dict.items():
        if not key.startswith("_"):
            event_dict[key] = _redact_value(value)
    return event_dict


def drop_color_message(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor: uvicorn passes its message again with colour escapes (``color_message``) as
    an ``extra`` field; the message itself is enough."""
    event_dict.pop("color_message", None)
    return event_dict


def configure_logging(json: bool = False, level: int = logging.INFO) -> None:
    """Route stdlib logging (ours, uvicorn's) through structlog so ``extra=`` fields become keys; colours
    only when stderr is a terminal, never escapes in a file or a pipe."""
    handler = logging.StreamHandler()
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=handler.stream.isatty())
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            drop_color_message,
            redact,
            renderer,
        ],
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(),
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
        ],
    )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
