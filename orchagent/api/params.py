"""Validation of request input: every value from a request passes through here first.

Values are checked against narrow patterns and returned as plain Python values; anything
else is a BadRequest naming the parameter.  Nothing here touches the host.
"""

from __future__ import annotations

import re

from orchagent.errors import BadRequest

_SEED_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
_NAME = re.compile(r"^[A-Za-z0-9_.+@:/-]{1,255}$")
_COMMAND = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def text(value: bytes | str | None, name: str) -> str:
    """A present, non-empty, UTF-8, NUL-free value."""
    if value is None:
        raise BadRequest(f"missing parameter {name}")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"parameter {name} is not UTF-8") from None
    if value == "":
        raise BadRequest(f"parameter {name} is empty")
    if "\x00" in value:
        raise BadRequest(f"parameter {name} contains a NUL byte")
    return value


def query(request, name: str, required: bool = True) -> str | None:
    """The single value of query parameter ``name``."""
    values = request.args.get(name.encode())
    if not values:
        if required:
            raise BadRequest(f"missing parameter {name}")
        return None
    if len(values) > 1:
        raise BadRequest(f"parameter {name} given more than once")
    return text(values[0], name)


def query_list(request, name: str) -> list[str]:
    return [text(v, name) for v in request.args.get(name.encode(), [])]


def seed_id(value) -> str:
    value = text(value, "seedId")
    if not _SEED_ID.fullmatch(value):
        raise BadRequest(f"invalid seed id {value!r}: letters, digits, '.', '_' and '-' only")
    return value


def host(value, name: str = "targetHost") -> str:
    """A host name or address, optionally with ``:port``."""
    value = text(value, name)
    if not _HOST.fullmatch(value):
        raise BadRequest(f"invalid host {value!r} in parameter {name}")
    return value


def volume_name(value, name: str = "lv") -> str:
    """A volume name or path: no shell metacharacters, no '..' component."""
    value = text(value, name)
    if not _NAME.fullmatch(value) or ".." in value.split("/"):
        raise BadRequest(f"invalid volume name {value!r} in parameter {name}")
    return value


def command_name(value) -> str:
    value = text(value, "cmd")
    if not _COMMAND.fullmatch(value):
        raise BadRequest(f"invalid command name {value!r}")
    return value


def non_negative_int(value, name: str) -> int:
    value = text(value, name)
    if not value.isdigit() or len(value) > 19:
        raise BadRequest(f"parameter {name} must be a non-negative integer, not {value!r}")
    return int(value)


def absolute_path(value, name: str = "path") -> str:
    value = text(value, name)
    if not value.startswith("/"):
        raise BadRequest(f"parameter {name} must be an absolute path, not {value!r}")
    if ".." in value.split("/"):
        raise BadRequest(f"parameter {name} must not contain '..': {value!r}")
    return value
