"""The seams of the agent: things with several implementations, or that tests replace."""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ICommandRunner(Interface):
    """Runs OS commands without blocking the reactor.

    The one way the agent runs a child process (except seed streams, which need a pipe
    of their own).  Tests swap in an expectation fake (``tests.support.fakes.FakeRunner``).
    """

    def run(argv, timeout=None, stdin=None, env=None, privileged=False, check=True,
            max_output=None, cwd=None, stdin_fd=None, stdout_fd=None, exited=None):
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
