"""The seams of the agent: things with several implementations, or that tests replace."""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ICommandRunner(Interface):
    """Runs OS commands without blocking the reactor.

    The one way the agent runs a child process (except seed streams, which need a pipe
    of their own).  Tests swap in an expectation fake (``tests.support.fakes.FakeRunner``).
    """

    def run(argv, timeout=None, stdin=None, env=None, privileged=False, check=True,
            max_output=None, cwd=None, stdin_fd=None, stdout_fd=None, exited=None, stall=0):
        """Run ``argv`` (a list: never shell text) in a process group of its own.

        :param timeout: seconds before the whole process group is killed; None = the
            configured default, 0 = none.
        :param stdin: bytes written to the child's standard input, then closed.
        :param privileged: prefix ``sudo -n`` when ExecWithSudo is set.
        :param check: fail with CommandFailed on non-zero exit (the usual case).
        :param cwd: the child's working directory.
        :param stdin_fd: a descriptor of ours the child reads as its standard input
            (a pipe's read end served by a worker thread); the caller closes its copy.
        :param stdout_fd: the same for its standard output.
        :param exited: a Deferred fired (with None) once the child has really exited;
            cancelling the returned Deferred stops the process group at once, and this
            says when it is gone.
        :param stall: seconds the process group may use no CPU time and do no I/O before
            it is stopped (a hung tool run with no time limit); 0 = no limit.
        :return: Deferred firing with a CommandResult; cancelling it stops the command.
        """

    def shell(text, args=(), timeout=None, stdin=None, check=True, max_output=None,
              exited=None):
        """Run operator-configured shell text with bash.

        ``args`` are passed as positional parameters appended to the command (``"$@"``)
        so request input is never interpolated into shell text.
        """

    def stop_all():
        """Stop every command still running (the agent's service stop)."""


class ISnapshotBackend(Interface):
    """One way of making and serving snapshots of the MySQL datadir (LVM, btrfs, copy).

    Every method is awaitable (async def).  Volumes are reported as LogicalVolume, the mount
    point as Mount (see orchagent.snapshots.model).
    """

    name = Attribute("The backend's config name: 'lvm', 'btrfs' or 'copy'.")

    def list_volumes(pattern=""):
        """All volumes (snapshots and origins) whose name contains ``pattern``."""

    def list_snapshots():
        """Snapshots matching SnapshotVolumesFilter: valid ones newest first, then invalid
        (overflowed) ones newest first; orchestrator seeds from the first."""

    def get_volume(name):
        """The one volume named (by name or path); NotFound otherwise."""

    def create_snapshot():
        """Snapshot the datadir's volume; fires with True."""

    def mount(name):
        """Mount snapshot ``name`` read-only on SnapshotMountPoint; fires with Mount."""

    def unmount():
        """Unmount SnapshotMountPoint; fires with Mount."""

    def mount_state():
        """The current Mount of SnapshotMountPoint."""

    def remove(name):
        """Remove snapshot ``name``; fires with True."""

    def restore(name):
        """Restore MySQL's datadir to snapshot ``name`` (stop, swap, keep old, start)."""


class ISeedSurface(Interface):
    """What the API and the controller use of seeds: the seed manager in the agent's
    process, or the proxy of the seed engine process (``orchagent.seed.remote``), which
    forwards each of these by name (``orchagent.seed.channel.CALLS`` is this list)."""

    def receive(seed_id, key=None):
        """Start receiving ``seed_id`` into the datadir; True once listening."""

    def send(target, seed_id, key=None, source="snapshot"):
        """Start sending ``seed_id`` to ``target`` (host or host:port) from ``source``
        (snapshot, datadir, hot); True once started."""

    def abort(seed_id):
        """Stop this host's side of the seed; True also for one never heard of."""

    def completed(seed_id):
        """Whether this host's side ended, either way."""

    def succeeded(seed_id):
        """Whether this host's side ended completed."""

    def status(seed_id):
        """The ``/api/seed-status`` body of one seed (NotFound when unknown)."""

    def all_status():
        """The status bodies of every seed remembered (not a Deferred)."""

    def set_rate_limit(seed_id, bytes_per_sec):
        """Change a running seed's rate limit (0: none)."""

    def datadir_usage():
        """``/api/mysql-du`` while a seed is received into the datadir, else None."""

    def reading_sources():
        """The sends that may still read their source (snapshot API refusals)."""


class ISeedJob(Interface):
    """One side of one seed, as the seed manager holds it by id (receive, send, streamed,
    command, hot)."""

    record = Attribute("The seed's SeedRecord (orchagent.seed.state), shared with the manager.")
    seed_id = Attribute("The record's seed id.")
    active = Attribute("True until the job ended, either way.")
    done = Attribute("A Deferred fired once the job ended and let go of everything.")

    def fail(message, final_state="failed"):
        """End the job (failed or aborted) with ``message``, unless it is too late (a
        promotion recorded); a Deferred fired once it ended."""

    def stop():
        """The agent stops: keep what a restart resumes from; a Deferred."""

    def progress():
        """(bytes per second lately, seconds left or None).  None unless the record's
        ``totals`` are FINAL or an ESTIMATE (orchagent.seed.state.eta): a job whose
        manifest is still walked or received reports its totals so far with ``totals``
        WALKING, and sets FINAL once they are exact."""


class ISeedStream(Interface):
    """One authenticated seed connection, as a job uses it: the target's
    (orchagent.seed.listener.ReceiverStream) or the source's
    (orchagent.seed.sender.SenderStream).  The stream owns its transport and its timers:
    a job says what to send and when to read, and never touches either."""

    peer = Attribute("The other agent's address.")
    key = Attribute("The stream key from the handshake: frames sealed off the reactor use it.")
    closed = Attribute("True once the connection is closed or closing.")
    buffered = Attribute("Bytes received of a frame not yet whole.")

    def send(frame_type, body):
        """Seal ``body`` (bytes, or a dict sent as JSON) in a frame of ``frame_type`` with
        the stream's key and send it."""

    def write(pieces):
        """Send frames sealed already (with :attr:`key`)."""

    def pause(reason):
        """Stop reading the connection for ``reason`` (the receiver's window, a rate
        limit): TCP pushes back on the peer."""

    def resume(reason):
        """``reason`` to stop reading is gone; reading resumes once none is left."""

    def later(delay, fn, *args):
        """Call ``fn(*args)`` in ``delay`` seconds, instead of the call set before; never
        once the stream closed."""

    def close(abort=False):
        """Close the connection (``abort``: at once, dropping what is unsent)."""


class IReceivePayload(Interface):
    """What a receive job (orchagent.seed.receiver) receives: a tree sent file by file
    (orchagent.seed.tree_receive) or a backup tool's stream (orchagent.seed.stream_receive).
    The job owns the record, staging, the promotion and the cleanup; the payload owns its
    streams and what they carry, and calls the job's ``install`` once staging holds the
    whole verified tree."""

    RESUMES = Attribute("Whether the seed resumes after an agent restart (else it fails).")
    STOPPED = Attribute("The error of a seed that cannot resume, at an agent stop.")

    def attach(stream, hello):
        """An admitted ISeedStream joins; raises Rejected if it may not."""

    def frame(stream, frame):
        """A frame from ``stream``."""

    def flush(stream):
        """The frames of one read of ``stream`` were handed over: write them."""

    def stream_lost(stream):
        """``stream``'s connection ended."""

    def rate_changed():
        """The job's rate limit changed."""

    def tell(result):
        """The seed ended: tell the sender ``result`` (RESULT's body) and let go of the
        streams."""

    def cancel():
        """The seed failed: stop what runs for it (tools)."""

    def drain():
        """A Deferred fired once no write or tool of the payload runs."""

    def let_go():
        """Close the files the payload holds open (journal, pipe)."""

    def close_streams():
        """The agent stops: close the streams at once."""

    def arriving():
        """Bytes received and not yet counted as done (shown by /api/mysql-du)."""
