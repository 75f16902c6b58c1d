"""Logging set-up for the command line: a level, and optionally JSON lines.

Library code only ever uses ``logging.getLogger(__name__)``; configuring
handlers is the application's business, so only the CLI calls this.
"""

from __future__ import annotations

import json
import logging
import os

__all__ = ["JsonFormatter", "setup_logging"]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, process, message."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str, json_lines: bool) -> None:
    """Configure the root logger; child processes inherit it through the
    ``EMBEDLINK_LOG_LEVEL`` and ``EMBEDLINK_LOG_JSON`` environment variables."""
    name = level.upper()
    if name not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"--log-level {level!r}: expected debug, info, warning, error or critical")
    handler = logging.StreamHandler()
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(name)
    os.environ["EMBEDLINK_LOG_LEVEL"] = name
    os.environ["EMBEDLINK_LOG_JSON"] = "1" if json_lines else "0"
