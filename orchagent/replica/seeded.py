"""What a receive job does between "checked on disk" and the promotion: the verified start
(:mod:`orchagent.replica.verify`, SeedVerifyStart) and the replication coordinates
(:mod:`orchagent.replica.coordinates`), kept in the seed's record as ``replication``.

A password found in the copy's master.info goes to ``StateDir/seeds/<id>.master-password``
(mode 0600, the directory 0700) and nowhere else: not the record, not a log line, not the
API, which shows ``MasterUser`` only.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from twisted.logger import Logger

from orchagent.host.mysql_options import load_server_options
from orchagent.replica import coordinates, verify
from orchagent.seed import state
from orchagent.seed.context import SeedContext

log = Logger()


class StagedSeed(Protocol):
    """The receive job, as far as this module reads and sets it."""

    context: SeedContext
    record: state.SeedRecord
    #: orchagent.seed.staging.Staging: ``root`` is the staged tree.
    staging: Any
    #: The throwaway server while it runs (an abort kills it), and its share done.
    start_check: Any
    check_share: float

PASSWORD_SUFFIX = "master-password"


def _runner(job: StagedSeed):
    if job.context.runner is not None:
        return job.context.runner
    from orchagent.process import ProcessRunner

    return ProcessRunner(job.context.reactor)


def _names(config) -> tuple[str, str, int | None]:
    """(blocking) master.info and relay-log.info names in the datadir, and this host's
    MySQL port, from the option files (defaults when they cannot be read)."""
    try:
        options = load_server_options(config.mysql_options_file)
    except Exception:  # unreadable option files: the check says so, this only names files
        return "master.info", "relay-log.info", 3306
    master = options.value("master_info_file") or "master.info"
    relay = options.value("relay_log_info_file") or "relay-log.info"
    port = coordinates._int(options.value("port")) or 3306
    return (os.path.basename(master), os.path.basename(relay), port)


async def check_staged_copy(job: StagedSeed) -> None:
    """Check that the staged copy starts (when SeedVerifyStart asks for it) and record
    its replication coordinates; raises verify.StartCheckFailed (the seed then fails with
    the datadir untouched).  The job's state is ``checking`` meanwhile."""
    context, record, root = job.context, job.record, job.staging.root
    source = getattr(job, "source_address", "") or record.peer_host
    master_name, relay_name, port = await context.thread(_names, context.config)
    found, info = await context.thread(coordinates.from_tree, root, source, relay_name, master_name,
                                       getattr(job, "source_master", None))
    server: dict = {}
    if await context.thread(verify.wanted, context.config.seed_verify_start, root):
        record.state = state.CHECKING
        context.touch(record, force=True)

        def progress(step: str) -> None:
            job.check_share = verify.STEPS.index(step) / len(verify.STEPS)

        check = verify.StartCheck(context.config, _runner(job), context.reactor, root,
                                  record.datadir, f"seed {record.seed_id}", context.thread,
                                  progress)
        job.start_check = check
        try:
            server = await check.run()
        finally:
            job.check_share = 1.0
    found = coordinates.complete(found, server, source, port)
    if info is not None and info.password:
        await context.thread(context.store.write, record.seed_id, PASSWORD_SUFFIX,
                             info.password.encode())
    if found.sources:
        record.replication = found.status()
        log.info("seed {seed}: replication coordinates of the copy: master {host}:{port}, "
                 "{file}:{pos}, GTID {gtid} (from {where})", seed=record.seed_id,
                 host=found.master_host, port=found.master_port, file=found.binlog_file,
                 pos=found.binlog_pos, gtid=found.gtid, where=", ".join(found.sources))
    context.touch(record, force=True)


def master_password(store: state.StateStore, seed_id: str) -> str | None:
    """The password the seeded copy's master.info held (blocking), None without one."""
    data = store.read(seed_id, PASSWORD_SUFFIX)
    return None if data is None else data.decode()
