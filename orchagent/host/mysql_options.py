"""MySQL/MariaDB option files (``my.cnf``), read the way the server reads them.

The agent learns the datadir, port, error log and log names from the same files the
server starts with, so it must read them with the server's rules, not an INI parser's.
The rules here were checked against ``my_print_defaults`` and ``mariadbd --print-defaults``
of MariaDB 10.11 (the tests compare with ``my_print_defaults``):

* ``#`` and ``;`` start a comment line; ``#`` outside quotes ends a line anywhere.
* ``[group]``: the name is compared without case and with trailing (not leading) blanks
  removed.  An option before any group is a fatal error, as in the server.
* ``name``, ``name=value``, ``name = value``; a value wrapped in matching quotes loses
  them; the escapes ``\\b \\t \\n \\r \\\\ \\s \\" \\'`` are decoded, any other backslash
  stays.  Later values override earlier ones, in file order, whatever the group.
* ``!include FILE`` (a missing file is skipped, like the server does) and
  ``!includedir DIR`` (its ``*.cnf`` files in name order; a missing directory is fatal).
  Relative include paths are resolved from ``/``, the server's working directory when
  systemd starts it.
* Dashes and underscores in option names are the same (``log-error`` == ``log_error``);
  ``loose-`` is ignored; ``skip-X`` and ``disable-X`` turn X off, ``enable-X`` turns it on.

The server groups are ``mysqld``, ``server``, ``mariadb``, ``mariadbd``, ``client-server``,
``galera``, and ``mysqld-X.Y`` / ``mariadb-X.Y`` / ``mariadbd-X.Y`` for the installed server
version X.Y when it is known (the caller asks the server binary only when the files have
such groups: see :func:`has_versioned_groups`).

Option files are a few small local files; reading them is quick enough to do inline,
on the reactor thread, every time a value is needed (so an edited my.cnf counts at once).
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Sequence

import attrs

from orchagent.errors import NotAvailable

#: The files the server reads when no --defaults-file is given, in order (Debian and RPM).
DEFAULT_OPTION_FILES = ("/etc/mysql/my.cnf", "/etc/my.cnf")

SERVER_GROUPS = ("mysqld", "server", "mariadb", "mariadbd", "client-server", "galera")
_VERSIONED_GROUPS = ("mysqld", "mariadb", "mariadbd")
_VERSIONED_GROUP = re.compile(r"^(mysqld|mariadb|mariadbd)-[0-9]+\.[0-9]+$")
_MAX_INCLUDE_DEPTH = 10
_DIRECTIVE = re.compile(r"^!(includedir|include)\s+(\S.*?)\s*$")
_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "r": "\r", "\\": "\\", "s": " ", '"': '"', "'": "'"}

class OptionFileError(NotAvailable):
    """An option file the server would refuse (or that cannot be read)."""


@attrs.frozen
class Option:
    """One option line as the server sees it.

    ``name`` keeps the spelling of the file; ``value`` is None for a bare option.
    ``where`` is ``file:line`` for messages.  ``disabled`` marks ``skip-X``/``disable-X``.
    """

    name: str
    value: str | None
    where: str
    disabled: bool = False


def server_groups(version: str | None = None) -> tuple[str, ...]:
    """The groups the server reads; ``version`` is ``"X.Y"`` of the installed server."""
    if not version:
        return SERVER_GROUPS
    return SERVER_GROUPS + tuple(f"{g}-{version}" for g in _VERSIONED_GROUPS)


def normalize(name: str) -> str:
    return name.replace("-", "_")


def read_options(paths: Sequence[str], groups: Iterable[str], required: bool = False,
                 seen_groups: set[str] | None = None) -> list[Option]:
    """All options of ``groups`` in ``paths`` (and their includes), in the server's order.

    A listed file that does not exist is skipped, unless ``required`` (the operator named
    it in MySQLOptionsFile: then it must exist).  ``seen_groups``, when given, receives
    the name of every group the files have.
    """
    wanted = {g.lower() for g in groups}
    options: list[Option] = []
    seen_groups = set() if seen_groups is None else seen_groups
    for path in paths:
        if not os.path.exists(path):
            if required:
                raise OptionFileError(f"MySQL option file {path} does not exist")
            continue
        _read_file(path, wanted, options, 0, (), seen_groups)
    return options


def _read_file(path: str, wanted: set[str], out: list[Option], depth: int, seen: tuple,
               groups_seen: set[str]) -> None:
    if depth > _MAX_INCLUDE_DEPTH or path in seen:
        raise OptionFileError(f"MySQL option file {path}: includes nested too deep (or in a loop)")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        if depth > 0:
            return
        raise OptionFileError(f"MySQL option file {path} does not exist") from None
    except OSError as e:
        raise OptionFileError(f"cannot read MySQL option file {path}: {e.strerror}") from e
    text = data.decode("utf-8", "replace")
    group: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        where = f"{path}:{number}"
        line = raw.lstrip()
        if not line or line[0] in "#;":
            continue
        if line[0] == "!":
            _directive(line, where, wanted, out, depth, seen + (path,), groups_seen)
            continue
        if line[0] == "[":
            end = line.find("]")
            if end < 0:
                raise OptionFileError(f"wrong group definition in MySQL option file at {where}")
            group = line[1:end].rstrip().lower()
            groups_seen.add(group)
            continue
        if group is None:
            raise OptionFileError(f"option without a preceding group in MySQL option file at {where}")
        if group not in wanted:
            continue
        option = _parse_option(_remove_comment(line), where)
        if option is not None:
            out.append(option)


def _directive(line: str, where: str, wanted, out, depth, seen, groups_seen) -> None:
    match = _DIRECTIVE.match(line)
    if match is None:
        raise OptionFileError(f"unknown directive in MySQL option file at {where}: {line.strip()!r}")
    word, target = match.group(1), os.path.join("/", match.group(2))
    if word == "include":
        _read_file(target, wanted, out, depth + 1, seen, groups_seen)
        return
    try:
        names = sorted(n for n in os.listdir(target) if n.endswith(".cnf"))
    except OSError as e:
        raise OptionFileError(f"cannot read directory {target} named by !includedir at {where}: {e.strerror}") from e
    for name in names:
        _read_file(os.path.join(target, name), wanted, out, depth + 1, seen, groups_seen)


def _remove_comment(line: str) -> str:
    quote = ""
    escape = False
    for i, c in enumerate(line):
        if c in "'\"" and not escape:
            if not quote:
                quote = c
            elif quote == c:
                quote = ""
        if not quote and c == "#":
            return line[:i]
        escape = bool(quote) and c == "\\" and not escape
    return line


def _parse_option(line: str, where: str) -> Option | None:
    name, eq, value = line.partition("=")
    name = name.strip()
    if not eq:
        return Option(name, None, where) if name else None
    value = value.strip()
    if len(value) >= 2 and value[0] in "'\"" and value[-1] == value[0]:
        value = value[1:-1]
    return Option(name, _unescape(value), where)


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    out = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value) and value[i + 1] in _ESCAPES:
            out.append(_ESCAPES[value[i + 1]])
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


class ServerOptions:
    """The effective server settings of a list of options: the last one of a name wins."""

    def __init__(self, options: Iterable[Option], files: Sequence[str] = ()):
        self.files = tuple(files)
        self._values: dict[str, Option] = {}
        for option in options:
            name = normalize(option.name)
            if name.startswith("loose_"):
                name = name[len("loose_"):]
            value, disabled = option.value, False
            for prefix in ("skip_", "disable_"):
                if name.startswith(prefix):
                    name, value, disabled = name[len(prefix):], None, True
            if name.startswith("enable_"):
                name, value = name[len("enable_"):], None
            self._values[name] = Option(name, value, option.where, disabled)

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def get(self, name: str) -> Option | None:
        """The option that set ``name`` last (None when unset or turned off by skip-)."""
        option = self._values.get(normalize(name))
        return None if option is None or option.disabled else option

    def value(self, name: str, default: str | None = None) -> str | None:
        """The value of ``name`` (None for a bare option), else ``default``."""
        option = self.get(name)
        return default if option is None else option.value

    def describe(self) -> str:
        """Which files these came from, for messages."""
        return ", ".join(self.files) or "no option files"


def option_files(options_file: str = "") -> tuple[tuple[str, ...], bool]:
    """The files to read and whether they must exist: MySQLOptionsFile, else the defaults."""
    if options_file:
        return (options_file,), True
    return tuple(p for p in DEFAULT_OPTION_FILES if os.path.exists(p)), False


def load_server_options(options_file: str = "", version: str | None = None,
                        seen_groups: set[str] | None = None) -> ServerOptions:
    """The server's options: from ``options_file`` when given, else the default files."""
    files, required = option_files(options_file)
    options = read_options(files, server_groups(version), required, seen_groups)
    return ServerOptions(options, files)


def has_versioned_groups(groups: Iterable[str]) -> bool:
    """Whether any of ``groups`` is a ``[mysqld-X.Y]``-style group (needs the version)."""
    return any(_VERSIONED_GROUP.match(g) for g in groups)
