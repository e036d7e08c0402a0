"""Run one restore in a child process and kill -9 it at an exact step (tests).

    python -m tests.support.crash_restore CONFIG.json NAME CRASH

``CONFIG.json`` holds :class:`~orchagent.config.Config` attributes (snake_case), ``NAME``
is the snapshot or backup to restore through the agent's snapshot front (as
``/api/restore-snapshot`` does), and ``CRASH`` is ``<command>:<n>:<before|after>``: the
process sends itself SIGKILL right before, or right after, the ``n``-th command whose
``argv[0]`` is ``<command>`` (e.g. ``mv:1:after``: the first rename was made, nothing after
it).  The agent makes every rename of a restore with ``mv``, each journaled just before,
so "before ``mv`` n" is "the journal records step n, the rename is not made" and "after
``mv`` n" is "the rename is made, the journal not yet told".  ``none`` never crashes.

The exit status says how it ended: killed by SIGKILL (-9 for ``subprocess``), 0 when the
restore succeeded, 3 when it failed (its message on standard output).
"""

from __future__ import annotations

import json
import os
import signal
import sys

from twisted.internet import defer, task


class CrashingRunner:
    """A runner that kills this process at the chosen command; see the module docstring."""

    def __init__(self, runner, crash: str):
        self.runner = runner
        self.command, number, self.when = crash.split(":") if crash != "none" else ("", "0", "")
        self.number = int(number)
        self.seen = 0

    def _kill(self, result=None):
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        return result

    def run(self, argv, *args, **kwargs):
        argv = [str(a) for a in argv]
        if self.command and argv[0] == self.command:
            self.seen += 1
            if self.seen == self.number:
                print(f"crash {self.when} {' '.join(argv)}", flush=True)
                if self.when == "before":
                    self._kill()
                d = defer.maybeDeferred(self.runner.run, argv, *args, **kwargs)
                return d.addBoth(self._kill)
        return self.runner.run(argv, *args, **kwargs)

    def shell(self, text, args=(), **kwargs):
        argv = ["bash", "-c", f'{text} "$@"' if args else text, "orchagent", *map(str, args)]
        return self.run(argv, **kwargs)

    def __getattr__(self, name):
        return getattr(self.runner, name)


async def restore(reactor, config_path: str, name: str, crash: str) -> int:
    from orchagent.agent import build_agent
    from orchagent.config import Config
    from orchagent.errors import AgentError
    from orchagent.process import ProcessRunner
    from orchagent.token import Token

    with open(config_path, encoding="utf-8") as fh:
        config = Config(**json.load(fh))
    runner = CrashingRunner(ProcessRunner(reactor, default_timeout=300), crash)
    agent = build_agent(config, reactor, runner=runner, token=Token("crash-restore"))
    try:
        await agent.snapshots.restore(name)
    except AgentError as e:
        print(f"failed: {e.message}", flush=True)
        return 3
    print("restored", flush=True)
    return 0


def main(reactor, config_path: str, name: str, crash: str):
    d = defer.ensureDeferred(restore(reactor, config_path, name, crash))
    d.addCallback(lambda code: sys.exit(code) if code else None)
    return d


if __name__ == "__main__":
    task.react(main, sys.argv[1:4])
