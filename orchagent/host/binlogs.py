"""Relay logs and binary logs, read from the files (no MySQL credentials needed).

The endpoints answer as the original agent did:

* relay log coordinates are ``{"LogFile": <full path>, "LogPos": <file size>, "Type": 1}``
  — orchestrator's ``BinlogCoordinates``, whose ``Type`` is a Go int enum
  (0 = BinaryLog, 1 = RelayLog).
* contents are gzip then base64 (one line, no newline; ``base64 -d`` and orchestrator
  accept it).
* binary contents are a valid binary log stream: when ``start`` is not 0 the first file's
  header (the magic bytes and the format description event) comes first, then the first
  file from ``start``; every later file follows without its header; the last file ends
  at ``stop`` (0 = its end).  Positions must lie inside the files: a range that does not
  exist is refused, not silently shortened.

Names in requests are matched against the server's own index files (binlog index and
relay log index): a bare file name or the full path of a listed file.  Anything else —
another path, ``..``, a file not in an index — is refused before any file is opened.
Request input never reaches a shell: ``mysqlbinlog`` runs as an argv, and the relay log
contents to apply are fed to the configured client pipeline on its standard input.
"""

from __future__ import annotations

import base64
import gzip
import io
import os
import struct
import zlib

from twisted.internet import threads

from orchagent.errors import AgentError, BadRequest, NotAvailable, NotFound

#: orchestrator's BinlogType enum.
BINARY_LOG, RELAY_LOG = 0, 1
BINLOG_MAGIC = b"\xfebin"
FORMAT_DESCRIPTION_EVENT = 15
_EVENT_HEADER = struct.Struct("<IBIII H")
#: MariaDB's mysqlbinlog checks that GTIDs continue from one file to the next, which a
#: range starting inside a file (or files with their headers dropped) does not satisfy;
#: ``loose-`` keeps MySQL's mysqlbinlog, which has no such check, from refusing the option.
MYSQLBINLOG = ("mysqlbinlog", "--no-defaults", "--loose-skip-gtid-strict-mode")
#: Largest relay log contents apply-relaylog-contents decompresses (kept in memory).
MAX_APPLY_BYTES = 1024 * 1024 * 1024
_CHUNK = 1024 * 1024


def binlog_header_size(path: str) -> int:
    """Bytes of the magic number plus the format description event at the file's start."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4 + _EVENT_HEADER.size)
    except OSError as e:
        raise AgentError(f"cannot read {path}: {e.strerror}") from e
    if len(head) < 4 + _EVENT_HEADER.size or head[:4] != BINLOG_MAGIC:
        raise AgentError(f"{path} is not a MySQL binary log (no binlog magic number)")
    _, kind, _, length, _, _ = _EVENT_HEADER.unpack(head[4:])
    if kind != FORMAT_DESCRIPTION_EVENT:
        raise AgentError(f"{path} does not start with a format description event")
    return 4 + length


def plan_segments(paths: list[str], start: int, stop: int) -> list[tuple[str, int, int]]:
    """The ``(path, from, to)`` byte ranges of a binary contents answer (blocking: stats).

    See the module docstring for the layout; raises BadRequest for positions outside
    the files.
    """
    sizes = []
    for path in paths:
        try:
            sizes.append(os.stat(path).st_size)
        except OSError as e:
            raise AgentError(f"cannot read {path}: {e.strerror}") from e
    segments = []
    last = len(paths) - 1
    for i, path in enumerate(paths):
        begin, end = 0, sizes[i]
        if i > 0:
            begin = binlog_header_size(path)
        if i == 0 and start:
            header = binlog_header_size(path)
            if start < header or start > sizes[0]:
                raise BadRequest(
                    f"start {start} is outside the events of {os.path.basename(path)} "
                    f"(from {header} to {sizes[0]})")
            segments.append((path, 0, header))
            begin = start
        if i == last and stop:
            if stop > sizes[i] or stop < begin:
                raise BadRequest(
                    f"stop {stop} is outside {os.path.basename(path)} (from {begin} to {sizes[i]})")
            end = stop
        segments.append((path, begin, end))
    return segments


def gzip_base64_segments(segments: list[tuple[str, int, int]]) -> str:
    """The bytes of ``segments``, gzip-compressed while read, then base64 (blocking)."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as compressed:
        for path, begin, end in segments:
            try:
                with open(path, "rb") as fh:
                    fh.seek(begin)
                    remaining = end - begin
                    while remaining > 0:
                        chunk = fh.read(min(_CHUNK, remaining))
                        if not chunk:
                            raise AgentError(f"{path} became shorter than {end} bytes while read")
                        compressed.write(chunk)
                        remaining -= len(chunk)
            except OSError as e:
                raise AgentError(f"cannot read {path}: {e.strerror}") from e
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def gzip_base64(data: bytes) -> str:
    return base64.b64encode(gzip.compress(data, mtime=0)).decode("ascii")


def gunzip_bounded(payload: bytes, limit: int = MAX_APPLY_BYTES) -> bytes:
    """Decompress gzip ``payload``; refuse invalid data and anything over ``limit`` bytes."""
    decompressor = zlib.decompressobj(wbits=31)
    try:
        data = decompressor.decompress(payload, limit + 1)
    except zlib.error as e:
        raise BadRequest(f"relay log contents are not valid gzip data: {e}") from None
    if len(data) > limit:
        raise BadRequest(f"relay log contents are larger than {limit} bytes once decompressed")
    if not decompressor.eof:
        raise BadRequest("relay log contents are not valid gzip data: truncated")
    return data


def read_index(index_path: str, datadir: str) -> list[str]:
    """The files listed in a binlog/relay log index, as absolute paths.

    Relative entries (``./name``) are relative to the datadir, the server's working
    directory.
    """
    try:
        with open(index_path, "rb") as fh:
            text = fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        raise NotFound(f"the index file {index_path} does not exist") from None
    except OSError as e:
        raise AgentError(f"cannot read the index file {index_path}: {e.strerror}") from e
    return [os.path.normpath(os.path.join(datadir, line.strip()))
            for line in text.splitlines() if line.strip()]


class MySQLLogs:
    """The relay-log and binlog endpoints."""

    def __init__(self, config, runner, reactor, host):
        self.config = config
        self.runner = runner
        self.reactor = reactor
        self.host = host

    def _in_thread(self, function, *args):
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), function, *args)

    # --- relay logs --------------------------------------------------------------------

    async def relay_log_index_file(self) -> str:
        path = await self.host.relay_log_index_path()
        if not os.path.exists(path):
            raise NotFound(f"the relay log index {path} does not exist (this server has not been a replica)")
        return path

    async def relay_log_files(self) -> list[str]:
        """Full paths of the relay logs in the index, oldest first (the index is tiny)."""
        return read_index(await self.relay_log_index_file(), await self.host.datadir())

    async def relay_log_end_coordinates(self) -> dict:
        files = await self.relay_log_files()
        if not files:
            raise NotFound("the relay log index lists no relay logs")
        last = files[-1]
        try:
            size = os.stat(last).st_size
        except OSError as e:
            raise AgentError(f"cannot read the relay log {last}: {e.strerror}") from e
        return {"LogFile": last, "LogPos": size, "Type": RELAY_LOG}

    async def relaylog_contents_tail(self, relaylog: str, start: int) -> str:
        """Relay logs from ``relaylog`` at ``start`` to the end of the last, gzip+base64."""
        files = await self.relay_log_files()
        first = _position_in(files, relaylog, "relay log")
        segments = await self._in_thread(plan_segments, files[first:], start, 0)
        return await self._in_thread(gzip_base64_segments, segments)

    # --- binary logs -------------------------------------------------------------------

    async def _known_logs(self) -> list[str]:
        """Every binlog and relay log the server's indexes list."""
        known: list[str] = []
        datadir = await self.host.datadir()
        for lookup in (self.host.binlog_index_path, self.host.relay_log_index_path):
            try:
                known += read_index(await lookup(), datadir)
            except (NotFound, NotAvailable):
                continue
        return known

    async def _resolve(self, names: list[str]) -> list[str]:
        if not names:
            raise BadRequest("missing parameter binlog")
        known = await self._known_logs()
        if not known:
            raise NotAvailable("this server has no binary logs or relay logs (no index files)")
        return [known[_position_in(known, name, "binlog")] for name in names]

    async def binlog_contents(self, names: list[str], start: int = 0, stop: int = 0) -> str:
        """``mysqlbinlog`` text of the files, ``start`` in the first, ``stop`` in the last."""
        paths = await self._resolve(names)
        argv = list(MYSQLBINLOG)
        if start:
            argv.append(f"--start-position={start}")
        if stop:
            argv.append(f"--stop-position={stop}")
        result = await self.runner.run([*argv, "--", *paths], privileged=True)
        return await self._in_thread(gzip_base64, result.stdout)

    async def binlog_binary_contents(self, names: list[str], start: int = 0, stop: int = 0) -> str:
        paths = await self._resolve(names)
        segments = await self._in_thread(plan_segments, paths, start, stop)
        return await self._in_thread(gzip_base64_segments, segments)

    # --- applying ----------------------------------------------------------------------

    async def apply_relaylog_contents(self, payload: bytes) -> None:
        """Apply gzip'd binary log contents (already base64-decoded) with the MySQL client.

        The decompressed bytes must be a binary log stream (magic number first).  They go
        to ``mysqlbinlog -`` (see :data:`MYSQLBINLOG`) on standard input, whose SQL is piped into
        ``MySQLClientCommand``; a failure of either side fails the call.
        """
        client = self.config.mysql_client_command
        if not client:
            raise NotAvailable("MySQLClientCommand is not configured")
        data = await self._in_thread(gunzip_bounded, payload)
        if not data.startswith(BINLOG_MAGIC):
            raise BadRequest("relay log contents are not a MySQL binary log (no binlog magic number)")
        await self.runner.shell(f"set -o pipefail; {' '.join(MYSQLBINLOG)} - | {client}", stdin=data)


def _position_in(files: list[str], name: str, what: str) -> int:
    """Index in ``files`` of ``name``: a listed file's full path or its bare file name."""
    if "\x00" in name or name in ("", ".", "..") or (
            "/" in name and (not name.startswith("/") or os.path.normpath(name) != name)):
        raise BadRequest(f"invalid {what} name {name!r}: a file name or the full path of a listed file")
    for i, path in enumerate(files):
        if name == path or ("/" not in name and name == os.path.basename(path)):
            return i
    raise NotFound(f"{what} {name!r} is not in the server's index files")
