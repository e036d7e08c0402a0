"""Seed state that outlives the process, and the small meters a seed runs on.

Under ``StateDir/seeds`` (directory mode 0700) each seed has ``<id>.json`` (its
:class:`SeedRecord`), and while it runs possibly ``<id>.key`` (the derived per-seed
secret, mode 0600, never the controller's key), ``<id>.manifest`` and ``<id>.journal``
(receiver: the manifest and one fixed-size record per chunk verified and written).  The
journal is trusted only after re-hashing the staged bytes it names, so it needs no fsync.
Large chunk tables and manifests, the MANIFEST batches on both sides and the sender's
file digests live there too while a seed runs, in unnamed files (O_TMPFILE) that are
gone with the engine (orchagent.seed.spill).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import struct
from collections import deque
from typing import Any, Iterable, Iterator

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from orchagent.errors import AgentError, Refused
from orchagent.interfaces import IReceivePayload, ISeedJob
from orchagent.swap import replace_file

log = Logger()

PENDING, RUNNING, VERIFYING, COMPLETED, FAILED, ABORTED = (
    "pending", "running", "verifying", "completed", "failed", "aborted")
#: A receiver's verified tree is being started by a throwaway server (SeedVerifyStart),
#: after verifying and before the promotion.
CHECKING = "checking"
#: A sender aborted after the whole tree was sent, whose receiver never said how the seed
#: ended (it may have completed it): the receiver's status is the truth.
UNKNOWN = "unknown"
TERMINAL = frozenset((COMPLETED, FAILED, ABORTED, UNKNOWN))

# How far a side's BytesTotal and FilesTotal can be trusted: the status's ``Totals``
# (orchagent's own field: /api/seed-status is not part of the v1 API).  A seed of a
# million files spends its first seconds walking them, and an ETA or a percentage from
# totals that are still growing is wrong in a way an operator cannot see: it falls toward
# zero, then jumps back up when the walk finds more.
#: The manifest is still being walked (sender) or received (receiver): the totals count
#: what was found so far and only grow.  No ETA.
WALKING = "walking"
#: BytesTotal is a guess made before the data exists (a streamed hot seed: the source's
#: datadir size); FilesTotal is unknown (0).  An ETA against the guess while BytesDone
#: is below it, none past it.
ESTIMATE = "estimate"
#: Exact: the whole manifest is known, or the stream ended.
FINAL = "final"
#: Never known here: a seed command (SendSeedDataCommand...) moves the bytes.
UNCOUNTED = "unknown"
JOURNAL_RECORD = struct.Struct(">IQI32s")


def rfc3339(ts: float | None) -> str | None:
    """``ts`` (Unix seconds) as an RFC 3339 UTC time, to the second; None stays None."""
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.define
class SeedRecord:
    """One side of one seed, as persisted and as reported by /api/seed-status."""

    seed_id: str
    role: str
    state: str = PENDING
    bytes_total: int = 0
    bytes_done: int = 0
    files_total: int = 0
    files_done: int = 0
    resumes: int = 0
    error: str = ""
    started_at: float = 0.0
    updated_at: float = 0.0
    mode: str = "engine"
    target: str = ""
    source: str = ""
    source_path: str = ""
    datadir: str = ""
    keyed: bool = False
    rate_limit: int = 0
    peer_host: str = ""
    promoting: bool = False
    #: A receiver's replication coordinates of the copy (orchagent.replica.coordinates:
    #: the status's ``Replication``), None while unknown.  Never a password.
    replication: dict | None = None
    #: WALKING, ESTIMATE, FINAL or UNCOUNTED: what bytes_total and files_total are.
    totals: str = WALKING

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "SeedRecord":
        names = {f.name for f in attrs.fields(cls)}
        fields = {k: v for k, v in data.items() if k in names}
        if "totals" not in fields and fields.get("state") == COMPLETED:
            fields["totals"] = FINAL  # saved before the field: a completed seed's were exact
        return cls(**fields)

    def status(self, rate: float, eta: float | None) -> dict[str, Any]:
        return {
            "SeedId": self.seed_id,
            "Role": self.role,
            "State": self.state,
            "BytesTotal": self.bytes_total,
            "BytesDone": self.bytes_done,
            "FilesTotal": self.files_total,
            "FilesDone": self.files_done,
            "RateBytesPerSec": int(rate),
            "EtaSeconds": None if eta is None else int(round(eta)),
            "Totals": self.totals,
            "Resumes": self.resumes,
            "Error": self.error,
            "StartedAt": rfc3339(self.started_at or None),
            "UpdatedAt": rfc3339(self.updated_at or None),
            **({"Replication": self.replication} if self.role == "receiver" else {}),
        }


def cancelled(call) -> None:
    """Cancel a timed call (IDelayedCall) unless it is None or has run."""
    if call is not None and call.active():
        call.cancel()


def tracked(d: defer.Deferred, pending: set) -> defer.Deferred:
    """``d``, in ``pending`` until it fires (its result passes on)."""
    pending.add(d)

    def fired(result):
        pending.discard(d)
        return result

    return d.addBoth(fired)


def failure_message(failure, seed_id: str, what: str, oserror: str | None = None) -> str:
    """What a seed fails with for ``failure``: an AgentError's own message; with
    ``oserror``, an OSError after it; anything else is a bug, logged with its traceback
    and said as ``what`` failed."""
    if failure.check(AgentError):
        return failure.value.message
    if oserror is not None and failure.check(OSError):
        return f"{oserror}: {failure.value}"
    log.failure("seed {seed}: {what} failed", failure, seed=seed_id, what=what)
    return f"{what} failed: {failure.value}"


def refuse_while_receiving(statuses, action: str) -> None:
    """Refused naming the seed while one is being received into the datadir (``statuses``:
    seed-status bodies): starting MySQL, emptying or restoring the datadir under it would
    have the seed swap its tree in under a running server, or delete its staging."""
    for status in statuses:
        if status["Role"] == "receiver" and status["State"] not in TERMINAL:
            raise Refused(f"seed {status['SeedId']} is being received into the datadir: refusing to "
                          f"{action} until it ends (abort it, or wait)")


@implementer(ISeedJob)
class JobIdentity:
    """What every seed job shows the manager: its seed id, whether it still runs, its
    rate and ETA; and how it ends (:meth:`end_record`, :meth:`_settle`, then ``done``
    fires).  ``context``: what a job may use of the agent (orchagent.seed.context)."""

    #: Its rate (:class:`RateMeter`), or None where the job sees no bytes move (a seed
    #: command moves them; a hot backup being made has none yet to send): no rate, no ETA.
    meter: "RateMeter | None" = None

    def __init__(self, context, record: SeedRecord):
        self.context = context
        self.record = record
        self.done = defer.Deferred()

    @property
    def seed_id(self) -> str:
        return self.record.seed_id

    @property
    def active(self) -> bool:
        return not self.record.terminal

    def end_record(self, message: str, final_state: str, log) -> None:
        """Mark the record failed or aborted with ``message``, and say so in ``log``."""
        self.record.state, self.record.error = final_state, message
        if final_state == FAILED:
            log.error("seed {seed} failed: {message}", seed=self.seed_id, message=message)
        elif final_state == UNKNOWN:
            log.warn("seed {seed} ended, how is unknown here: {message}", seed=self.seed_id,
                     message=message)
        else:
            log.warn("seed {seed} aborted: {message}", seed=self.seed_id, message=message)

    def _settle(self) -> None:
        """The job is over: the manager forgets it, and ``done`` fires."""
        self.context.job_ended(self)
        if not self.done.called:
            self.done.callback(None)

    def progress(self) -> tuple[float, float | None]:
        """Bytes per second lately, and the seconds left at that rate: None while no
        honest figure exists (:func:`eta`: the totals still grow, or nothing moves)."""
        if self.meter is None:
            return 0.0, None
        record = self.record
        self.meter.sample(record.bytes_done)
        rate = self.meter.rate()
        return rate, eta(record.totals, record.bytes_total - record.bytes_done, rate)


@implementer(IReceivePayload)
class ReceivePayload:
    """What both payloads of a receive job share (a tree, orchagent.seed.tree_receive,
    or a stream, orchagent.seed.stream_receive): ``job``, the seed's
    orchagent.seed.receiver.ReceiveJob, with its context, record and staging; and the
    worker-thread writes in flight, which :meth:`drain` waits for."""

    def __init__(self, job):
        self.job = job
        self.context = job.context
        self.record = job.record
        self.staging = job.staging
        self.seed_id = job.seed_id
        self.inflight: set[defer.Deferred] = set()

    async def drain(self) -> None:
        while self.inflight:
            await defer.DeferredList(list(self.inflight), consumeErrors=True)


def eta(totals: str, remaining: int, rate: float) -> float | None:
    """Seconds left for ``remaining`` bytes at ``rate``, given what the totals are: None
    while they are WALKING (see WALKING; extrapolating the total is no better: a
    datadir's files come in directory order, not size order, so the share walked says
    little about the share left); against an ESTIMATE, None once the bytes done pass it
    (never 0 for a seed still moving)."""
    if totals == FINAL and remaining <= 0:
        return 0.0
    if totals not in (FINAL, ESTIMATE) or remaining <= 0 or rate <= 0:
        return None
    return remaining / rate


class StateStore:
    """Files of seed state under ``state_dir/seeds``; every write is atomic (rename)."""

    def __init__(self, state_dir: str):
        self.root = os.path.join(state_dir, "seeds")

    def open(self) -> None:
        for path in (os.path.dirname(self.root), self.root):
            os.makedirs(path, mode=0o700, exist_ok=True)
            os.chmod(path, 0o700)

    def path(self, seed_id: str, suffix: str) -> str:
        return os.path.join(self.root, f"{seed_id}.{suffix}")

    def write(self, seed_id: str, suffix: str, data: bytes | Iterable[bytes]) -> None:
        """Replace the file whole with ``data`` or its pieces as they are made
        (:func:`orchagent.swap.replace_file`; not fsynced: a seed's state is rewritten
        every few seconds while it runs)."""
        replace_file(self.path(seed_id, suffix), data, durable=False)

    def read(self, seed_id: str, suffix: str) -> bytes | None:
        try:
            with open(self.path(seed_id, suffix), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def remove(self, seed_id: str, *suffixes: str) -> None:
        """Remove the files (and a write of theirs a crash cut short)."""
        for suffix in suffixes:
            for path in (self.path(seed_id, suffix), self.path(seed_id, suffix) + ".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def save(self, record: SeedRecord) -> None:
        self.write(record.seed_id, "json", json.dumps(record.to_json(), indent=1).encode())

    def load_all(self) -> list[SeedRecord]:
        records = []
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return records
        for name in names:
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.root, name), "rb") as fh:
                    records.append(SeedRecord.from_json(json.loads(fh.read())))
            except (OSError, ValueError, TypeError) as e:
                log.warn("seed state file {name} is unreadable and ignored: {error}",
                         name=name, error=e)
        return records


def read_journal(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """Whole records of a journal, one at a time (a list of a million took 190 MB); a
    torn last record is ignored."""
    return JOURNAL_RECORD.iter_unpack(memoryview(data)[:len(data) - len(data) % JOURNAL_RECORD.size])


class RateMeter:
    """Bytes per second over the last ``window`` seconds, and the time left at that rate.

    The rate is measured from the first sample after which bytes moved, not from the
    first sample: a seed's first seconds move no data (the sender walks the source, the
    receiver checks the manifest and makes room: 15 s for a million files, or a resumed
    seed waiting for its sender), and a window that counted them at 0 B/s would start
    the ETA several times too long.  ``clock`` provides ``seconds()`` (the reactor, or a
    ``task.Clock`` in tests)."""

    def __init__(self, clock, window: float = 10.0):
        self.clock = clock
        self.window = window
        self._samples: deque = deque()

    def sample(self, done: int) -> None:
        now = self.clock.seconds()
        if len(self._samples) == 1 and self._samples[0][1] == done:
            self._samples[0] = (now, done)  # nothing moved yet: measure from now
            return
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] > self.window:
            self._samples.popleft()

    def rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


class TokenBucket:
    """A bytes-per-second limit shared by a seed's streams; 0 = none.

    Taking may overdraw the bucket (a chunk is never split for it); the caller then waits
    :meth:`delay` seconds before taking again, so the average rate is exact.
    """

    def __init__(self, clock, rate: int = 0):
        self.clock = clock
        self.rate = rate
        self._level = 0.0
        self._stamp = clock.seconds()

    def set_rate(self, rate: int) -> None:
        self._refill()
        self.rate = rate
        self._level = min(self._level, 0.0) if rate else 0.0

    def _refill(self) -> None:
        now = self.clock.seconds()
        if self.rate:
            # A burst of at most a quarter second's worth is kept.
            self._level = min(self._level + (now - self._stamp) * self.rate, self.rate / 4)
        self._stamp = now

    def delay(self) -> float:
        """Seconds to wait before the next take (0 when it may go now)."""
        if not self.rate:
            return 0.0
        self._refill()
        return 0.0 if self._level > -1 else -self._level / self.rate

    def take(self, n: int) -> None:
        if self.rate:
            self._refill()
            self._level -= n
