"""Log output of the operator and the agent: plain text for people, or one JSON object per line.

With `--log-format json` every record is a JSON object with `time` (RFC 3339, UTC),
`level`, `logger`, `message`, the process's `component`, and the fields a call site
passes in `extra=` — `job` (namespace/name), `model`, `agent`, `attempt` — so a log
pipeline can filter by them without parsing messages.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

LogFormat = Literal["text", "json"]
FORMATS: tuple[str, ...] = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def formatter(fmt: LogFormat, *, component: str, static: dict[str, str] | None = None) -> logging.Formatter:
    if fmt == "text":
        return logging.Formatter(TEXT_FORMAT)
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter("%(levelname)s %(name)s %(message)s", rename_fields={"levelname": "level", "name": "logger"},
                         static_fields={"component": component, **(static or {})}, timestamp="time")


def configure(*, level: int | str, fmt: LogFormat = "text", component: str,
              static: dict[str, str] | None = None) -> None:
    """Send the process's logs to stderr at `level`, as text or JSON (replacing earlier handlers)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt, component=component, static=static))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
