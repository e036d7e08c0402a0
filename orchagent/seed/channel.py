"""The private channel between the agent and its seed engine process.

The agent (:mod:`orchagent.seed.remote`, the parent) and the seed engine
(:mod:`orchagent.seed.engine_process`, its child) speak Twisted AMP over one Unix stream
socket pair that the parent makes before spawning the child and hands it as file
descriptor :data:`CHANNEL_FD`.  Nobody else can connect to it, unlike a TCP port, and
when either side dies the other reads EOF.

Parent to child, with an answer:

* :class:`Call` runs one seed manager method named in :data:`CALLS` with JSON
  arguments.  The answer holds the result, or the error: its class name in
  :mod:`orchagent.errors` and its message, so the parent raises the same type with the
  same text and the API answers the same v1 error body as with the manager in process.

Child to parent, without answers (a stream of facts, in order):

* :class:`Ready`: the manager started (seeds were resumed); calls may go.
* :class:`Statuses`: ``/api/seed-status`` bodies of the seeds that changed since the last
  push, and the ids of seeds the manager forgot, so the parent answers status reads from
  its copy with no round trip.
* :class:`Log`: one log event, already rendered, for the agent's own observers.
* :class:`CommandRan`: one OS command finished, for ``/metrics``.

AMP orders boxes on the one socket, and the child pushes the statuses a call changed
before it answers the call: once a call returned, the parent's copy shows its effect.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

from twisted.logger import LogLevel, formatEvent
from twisted.protocols import amp

from orchagent import errors
from orchagent.interfaces import ISeedSurface
from orchagent.logging import MASK, _field_value, _is_secret

#: The child's file descriptor of its end of the socket pair.
CHANNEL_FD = 3
#: Seed manager methods the parent may call: the public surface the API uses, no more.
CALLS = frozenset(ISeedSurface.names())
#: AMP refuses values over 65,535 bytes: statuses go in batches of JSON below this size,
#: and log texts (message, traceback, each field) are cut to these lengths.
BATCH_BYTES = 48 * 1024
MAX_LOG_TEXT = 16 * 1024
MAX_TRACEBACK = 32 * 1024
MAX_FIELD_TEXT = 2 * 1024
#: Error classes that cross the channel by name (an unknown subclass travels as the
#: nearest of these it derives from).
ERROR_TYPES = {cls.__name__: cls for cls in (
    errors.AgentError, errors.BadRequest, errors.NotFound, errors.Refused,
    errors.NotAvailable, errors.CommandFailed, errors.ConfigError)}


class JSON(amp.Argument):
    """An AMP argument holding any JSON value."""

    def toString(self, inObject: Any) -> bytes:
        return json.dumps(inObject, separators=(",", ":")).encode()

    def fromString(self, inString: bytes) -> Any:
        return json.loads(inString)


class QuietAMP(amp.AMP):
    """AMP without its "connection established/lost" log lines: the owners of the
    channel log what these mean (engine started, engine ended) themselves."""

    def makeConnection(self, transport):
        self._transportPeer = transport.getPeer()
        self._transportHost = transport.getHost()
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason):
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


class Call(amp.Command):
    arguments = [(b"method", amp.Unicode()), (b"args", JSON())]
    response = [(b"result", JSON())]


class Ready(amp.Command):
    arguments = [(b"pid", amp.Integer())]
    requiresAnswer = False


class Statuses(amp.Command):
    arguments = [(b"changed", JSON()), (b"removed", JSON()), (b"replace", amp.Boolean())]
    requiresAnswer = False


class Log(amp.Command):
    arguments = [(b"event", JSON())]
    requiresAnswer = False


class CommandRan(amp.Command):
    arguments = [(b"name", amp.Unicode()), (b"duration", amp.Float()), (b"ok", amp.Boolean())]
    requiresAnswer = False


class SeedEngineFailure(Exception):
    """An unexpected (non-AgentError) exception in the child; the API answers it as the
    internal error it would have been in process."""


def error_to_wire(error: BaseException) -> dict[str, Any]:
    for cls in type(error).__mro__:
        if ERROR_TYPES.get(cls.__name__) is cls:
            return {"type": cls.__name__, "message": error.message}
    return {"type": None, "message": str(error) or type(error).__name__}


def error_from_wire(data: dict[str, Any]) -> Exception:
    message = str(data.get("message", ""))
    return ERROR_TYPES.get(data.get("type") or "", SeedEngineFailure)(message)


def status_batches(statuses: list[dict]) -> Iterator[list[dict]]:
    """``statuses`` cut into lists whose JSON stays under BATCH_BYTES (never empty)."""
    batch: list[dict] = []
    size = 0
    for status in statuses:
        length = len(json.dumps(status)) + 1
        if batch and size + length > BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(status)
        size += length
    yield batch


# --- log events ------------------------------------------------------------------------------

#: Keys of legacy-API events that the record of the event already holds.
_LEGACY_KEYS = frozenset({"message", "system", "isError", "time", "format", "why", "printed",
                          "failure"})


class ChildTraceback:
    """Stands for the child's Failure in a re-emitted event: observers only format it."""

    def __init__(self, text: str):
        self.text = text

    def getTraceback(self, *args: Any, **kwargs: Any) -> str:
        return self.text

    def getErrorMessage(self) -> str:
        return self.text.rstrip().rsplit("\n", 1)[-1]


def event_to_wire(event: dict) -> dict[str, Any]:
    """A log event of the child as JSON: the rendered text, its level, namespace and time,
    the traceback of its failure, and its scalar fields, those named as secrets masked."""
    level = event.get("log_level")
    failure = event.get("log_failure")
    fields = {}
    for name, value in event.items():
        if name.startswith("log_") or name in _LEGACY_KEYS:
            continue
        value = MASK if _is_secret(name) else _field_value(value)
        if isinstance(value, str):
            value = value[:MAX_FIELD_TEXT]
        if value is not None:
            fields[name] = value
    traceback = None
    if failure is not None:
        try:
            traceback = failure.getTraceback()[-MAX_TRACEBACK:]
        except Exception as e:  # the event is still worth its text
            traceback = f"(no traceback: {e})"
    return {
        "text": formatEvent(event)[:MAX_LOG_TEXT],
        "level": level.name if level is not None else "info",
        "namespace": str(event.get("log_namespace", "-")),
        "system": _field_value(event.get("log_system")),
        "time": event.get("log_time"),
        "failure": traceback,
        "fields": fields,
    }


def event_from_wire(data: dict[str, Any]) -> dict[str, Any]:
    """The event to publish in the parent: the child's text as its format, so every
    observer (text, JSON, with their masking) renders it as its own."""
    event = dict(data.get("fields") or {})
    try:
        level = LogLevel.levelWithName(data.get("level") or "info")
    except Exception:
        level = LogLevel.info
    event.update(
        log_format="{log_text}", log_text=str(data.get("text", "")), log_level=level,
        log_namespace=str(data.get("namespace") or "-"),
    )
    if isinstance(data.get("system"), str):
        event["log_system"] = data["system"]
    when = data.get("time")
    event["log_time"] = when if isinstance(when, (int, float)) else time.time()
    if data.get("failure"):
        event["log_failure"] = ChildTraceback(str(data["failure"]))
    return event
