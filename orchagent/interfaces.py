"""The seams of the agent: things with several implementations, or that tests replace."""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ICommandRunner(Interface):
    """Runs OS commands without blocking the reactor.

    The one way the agent runs a child process (except seed streams, which need a pipe
    of their own).  Tests swap in an expectation fake (``tests.support.fakes.FakeRunner``).
    """

    def run(argv, timeout=None, stdin=None, env=None, privileged=False, check=True,
            max_output=None, cwd=None):
        """Run ``argv`` (a list: never shell text).

        :param timeout: seconds before the whole process group is killed; None = the
            configured default.
        :param stdin: bytes written to the child's standard input, then closed.
        :param privileged: prefix ``sudo -n`` when ExecWithSudo is set.
        :param check: fail with CommandFailed on non-zero exit (the usual case).
        :return: Deferred firing with a CommandResult.
        """

    def shell(text, args=(), timeout=None, stdin=None, check=True, max_output=None):
        """Run operator-configured shell text with bash.

        ``args`` are passed as positional parameters appended to the command (``"$@"``)
        so request input is never interpolated into shell text.
        """


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
