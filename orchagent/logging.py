"""Log output: twistd's human-readable lines by default, JSON lines when asked.

JSON lines are chosen either on twistd's command line,
``twistd --logger orchagent.logging.json_observer ...``, or in the configuration with
``"LogFormat": "json"``.  Each event becomes one JSON object on one line: ``time``,
``level``, ``namespace``, the rendered ``message``, the ``failure`` traceback if any, and
the event's own scalar fields (``seed_id``, ``command``, ``path``...) so a log shipper can
filter on them without parsing text.

Secrets stay out in both formats: the API's access log masks the values of ``token`` and
``key`` query parameters (:func:`redact`, used by :mod:`orchagent.service`), and the JSON
form masks them again in every message and drops the value of any field whose name says
it is secret (``token``, ``key``, ``password``...).
"""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime, timezone
from typing import Any, TextIO
from urllib.parse import unquote_plus

from twisted.application import service
from twisted.logger import FileLogObserver, ILogObserver, formatEvent
from twisted.python import logfile
from twisted.python.components import Componentized

#: Query parameters whose values are secrets: the API token and a seed's key.
_SECRET_PARAMS = frozenset({"token", "key"})
#: A query parameter as it was sent: its name (perhaps percent-encoded) and its value.
_QUERY_PARAM = re.compile(r"([?&])([^=&?\s\"']*)=[^&\s\"']*")
#: A field is secret when one of the ``_``-separated words of its name is one of these.
_SECRET_WORDS = frozenset({"token", "key", "password", "passwd", "secret", "passphrase", "auth"})
#: Keys of events that come from the legacy twisted.python.log API; the record has them.
_LEGACY_KEYS = frozenset({"message", "system", "isError", "time", "format", "why", "printed"})
#: Names components use for a seed's id; records carry it as ``seed_id`` too, for filters.
_SEED_ID_NAMES = ("seed_id", "SeedId", "seed")
MASK = "***"


def redact(text: str) -> str:
    """``text`` with the value of every ``token=`` and ``key=`` query parameter masked.

    Names are compared as the API reads them, percent- and ``+``-decoded (``t%6Fken=``
    authenticates like ``token=``), and without regard to case."""
    return _QUERY_PARAM.sub(_masked_param, text)


def _masked_param(match: re.Match) -> str:
    name = match.group(2)
    if "%" in name or "+" in name:
        name = unquote_plus(name, errors="replace")
    if name.lower() not in _SECRET_PARAMS:
        return match.group(0)
    return f"{match.group(1)}{match.group(2)}={MASK}"


def _is_secret(name: str) -> bool:
    return any(word in _SECRET_WORDS for word in name.lower().split("_"))


def _field_value(value: Any) -> Any:
    """A JSON-safe form of a scalar field, or None when the field is not a scalar."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, (bool, int, float)):
        return value
    return None


def event_record(event: dict) -> dict[str, Any]:
    """The JSON object one log event becomes (see the module docstring)."""
    level = event.get("log_level")
    when = datetime.fromtimestamp(event.get("log_time", 0.0), timezone.utc)
    record: dict[str, Any] = {
        "time": when.isoformat(timespec="milliseconds"),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", "-"),
        "message": redact(formatEvent(event)),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["failure"] = redact(failure.getTraceback())
    for name, value in event.items():
        if name.startswith("log_") or name in _LEGACY_KEYS or name in record:
            continue
        if _is_secret(name):
            record[name] = MASK
            continue
        value = _field_value(value)
        if value is not None:
            record[name] = value
    for name in _SEED_ID_NAMES:
        if name in record:
            record.setdefault("seed_id", record[name])
            break
    return record


def json_lines_observer(out: TextIO) -> FileLogObserver:
    """An observer writing each event to ``out`` as one line of JSON."""
    return FileLogObserver(out, lambda event: json.dumps(event_record(event)) + "\n")


def json_observer() -> FileLogObserver:
    """JSON lines on standard output; for ``twistd --logger orchagent.logging.json_observer``.

    twistd calls this before it redirects ``sys.stdout`` into the log, so the observer
    holds the real standard output.
    """
    return json_lines_observer(sys.stdout)


def configured_observer(config, options) -> FileLogObserver | None:
    """The observer ``LogFormat`` asks for, or None to keep twistd's own text observer.

    JSON lines go where twistd would have written its text: ``--logfile`` if given, else
    standard output under ``--nodaemon``, else ``twistd.log``.
    """
    if config.log_format != "json":
        return None
    twistd_options = getattr(options, "parent", None) or {}
    path = twistd_options.get("logfile") or ""
    if path == "-" or (twistd_options.get("nodaemon", True) and not path):
        return json_lines_observer(sys.stdout)
    return json_lines_observer(logfile.LogFile.fromFullPath(path or "twistd.log"))


class RootService(service.MultiService):
    """The daemon's top service, which also hands twistd the configured log observer.

    twistd asks the application for an :class:`ILogObserver` component after
    ``makeService`` returned and before logging starts (an explicit ``--logger`` still
    wins).  ``makeService`` never sees the application, but the application is the parent
    this service is attached to, so that is where the observer is set.
    """

    def __init__(self, log_observer: ILogObserver | None = None):
        super().__init__()
        self.log_observer = log_observer

    def setServiceParent(self, parent):
        if self.log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        return super().setServiceParent(parent)
