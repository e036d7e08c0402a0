"""What the controller prints: tables, sizes, durations and the seed's progress.

Pure functions of their input (no I/O) except :class:`Reporter`, which owns the output
stream and decides between a live, redrawn progress bar (a terminal) and plain progress
lines (a pipe or a log file, where ``\\r`` would make a mess).
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Sequence, TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(count: int | float | None) -> str:
    """``1536`` → ``"1.5 KiB"``; None → ``"?"``."""
    if count is None:
        return "?"
    value = float(count)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: int | float | None) -> str:
    """``3725`` → ``"1:02:05"``, ``65`` → ``"1:05"``; None or negative → ``"?"``."""
    if seconds is None or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_bar(done: int, total: int, width: int = 30) -> str:
    if total <= 0:
        return "[" + "?" * width + "]"
    filled = min(width, int(width * done / total))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def progress_line(status: dict[str, Any], width: int = 30) -> str:
    """One line from a target's seed-status: bar, percent, bytes, files, rate, ETA.

    The totals are shown for what the status says they are (``Totals``).  While the
    source is walked (``walking``) they are a count so far, marked ``+``, with neither a
    bar, a percentage nor an ETA: each would fall and then jump back as the walk finds
    more (a million files take seconds to walk).  An ``estimate`` (a hot seed's stream:
    the source datadir's size) is marked ``~``, and so are the percentage and ETA made
    from it.  An agent that does not say (an older one) is shown as before, as final."""
    done = int(status.get("BytesDone") or 0)
    total = int(status.get("BytesTotal") or 0)
    files_done = int(status.get("FilesDone") or 0)
    files_total = int(status.get("FilesTotal") or 0)
    totals = status.get("Totals", "final")
    walking, estimate = totals == "walking", totals == "estimate"

    def of(count: int, text: str) -> str:
        if walking:
            return text + "+"
        if not count:
            return "?"
        return "~" + text if estimate else text

    known = total > 0 and not walking
    percent = (f"{'~' if estimate else ''}{100 * min(done, total) / total:.1f}%" if known
               else "?%").rjust(6)
    eta = format_duration(status.get("EtaSeconds"))
    if walking:
        eta = "? (walking the source)"
    elif estimate and eta != "?":
        eta = "~" + eta
    parts = [
        progress_bar(done, total if known else 0, width), percent,
        f"{format_bytes(done)} / {of(total, format_bytes(total))}",
        f"files {files_done:,}/{of(files_total, f'{files_total:,}')}",
        f"{format_bytes(status.get('RateBytesPerSec') or 0)}/s",
        f"ETA {eta}",
    ]
    state = status.get("State", "")
    if state and state != "running":
        parts.append(state)
    if status.get("Resumes"):
        parts.append(f"resumed {status['Resumes']}x")
    return "  ".join(parts)


def replication_line(status: dict[str, Any]) -> str:
    """One line from /api/replication-status: lag, the master's binlog read up to (relay)
    and executed up to, and the two threads."""
    lag = status.get("SecondsBehindMaster")

    def at(file: Any, position: Any) -> str:
        return f"{file}:{position}" if file else "?"

    parts = [
        f"lag {'?' if lag is None else f'{lag} s'}",
        f"relay {at(status.get('MasterLogFile'), status.get('ReadMasterLogPos'))}",
        f"executed {at(status.get('RelayMasterLogFile'), status.get('ExecMasterLogPos'))}",
        f"IO {'yes' if status.get('IORunning') else 'no'}",
        f"SQL {'yes' if status.get('SQLRunning') else 'no'}",
    ]
    if status.get("GTIDIOPos"):
        parts.append(f"GTID {status['GTIDIOPos']}")
    return "  ".join(parts)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table with left-aligned columns and a rule under the header."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def key_values(pairs: Iterable[tuple[str, Any]]) -> str:
    """Two aligned columns: ``name   value``."""
    pairs = [(k, "" if v is None else str(v)) for k, v in pairs]
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}".rstrip() for k, v in pairs)


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True)


class Reporter:
    """The controller's voice: step messages, warnings and the live progress of a copy.

    On a terminal the progress line is redrawn in place; elsewhere a progress line is
    printed when the state changes or every ``line_interval`` seconds of seed time, so a
    log of a long seed stays readable.
    """

    def __init__(self, out: TextIO, err: TextIO, live: bool | None = None,
                 line_interval: float = 5.0, clock=None):
        self.out = out
        self.err = err
        self.live = out.isatty() if live is None else live
        self.line_interval = line_interval
        self.clock = clock
        self._drawn = False
        self._last_line_at: float | None = None
        self._last_state: str | None = None

    def _end_live_line(self) -> None:
        if self._drawn:
            self.out.write("\n")
            self._drawn = False

    def step(self, message: str) -> None:
        self._end_live_line()
        self.out.write(message + "\n")
        self.out.flush()

    def warn(self, message: str) -> None:
        self._end_live_line()
        self.err.write("warning: " + message + "\n")
        self.err.flush()

    def progress(self, status: dict[str, Any]) -> None:
        self._progress("progress", progress_line(status), status.get("State"))

    def replication(self, status: dict[str, Any]) -> None:
        """The replica catching up (the seed's --replicate), drawn like a copy's progress."""
        threads = (bool(status.get("IORunning")), bool(status.get("SQLRunning")))
        self._progress("replication", replication_line(status), str(threads))

    def _progress(self, label: str, line: str, state: Any) -> None:
        if self.live:
            self.out.write("\r\x1b[K" + ("" if label == "progress" else label + ": ") + line)
            self.out.flush()
            self._drawn = True
            return
        now = self.clock.seconds() if self.clock is not None else None
        due = (self._last_line_at is None or now is None
               or now - self._last_line_at >= self.line_interval or state != self._last_state)
        if due:
            self.out.write(f"{label}: {line}\n")
            self.out.flush()
            self._last_line_at = now
            self._last_state = state

    def finish_progress(self) -> None:
        self._end_live_line()
