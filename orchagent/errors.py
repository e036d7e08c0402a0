"""The one error hierarchy of the agent.

Every failure the agent reports to a caller is an :class:`AgentError`; the HTTP layer maps
all of them to the v1 error body ``{"Code": "ERROR", "Message": ..., "Details": null}``
with status 500, exactly as the original agent did.  Subclasses exist so that code and
tests can tell kinds of failure apart, not for the wire: the message is what an operator
reads, so it always names the thing that was wrong.
"""

from __future__ import annotations


class AgentError(Exception):
    """A failure that is reported to the caller with its message."""

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class BadRequest(AgentError):
    """A parameter is missing, malformed or unknown."""


class NotFound(AgentError):
    """A named thing (volume, seed, command) does not exist."""


class Refused(AgentError):
    """The request is understood but unsafe in the host's current state."""


class NotAvailable(AgentError):
    """The feature is not configured (or not possible) on this host."""


class CommandFailed(AgentError):
    """An OS command exited non-zero, was killed, or timed out."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


class StepFailed(AgentError):
    """A step of a longer operation failed (making a prepared copy of a backup, a hot
    seed); the message names the operation and the step."""


class ConfigError(AgentError):
    """The configuration file is unreadable or holds a wrong value."""


def reason_of(error: BaseException) -> str:
    """What ``error`` says to an operator inside another message: an AgentError's own
    message, anything else its type and text (a bare OSError's text alone hides which)."""
    return error.message if isinstance(error, AgentError) else f"{type(error).__name__}: {error}"
