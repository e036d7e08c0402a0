"""The daemon's command line and the configuration it names: what both ways in share
(:mod:`orchagent.tap` for twistd, :func:`orchagent.service.makeService` for tests).

Light on purpose, like :mod:`orchagent.tap`: nothing here imports Twisted's transports,
endpoints or Klein.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.python import usage

from orchagent import config as config_module
from orchagent.errors import ConfigError

log = Logger()


class Options(usage.Options):
    synopsis = "[--config FILE] [--port PORT]"
    longdesc = (
        "orchagent: the orchestrator-agent daemon. Serves the orchestrator-agent v1 HTTP "
        "API (host facts, MySQL service control, snapshots, seeds), registers with "
        "orchestrator when AgentsServer is set, and moves seed data between agents as "
        "verified TCP streams. Without --config it reads, like the original agent, "
        "/etc/orchestrator-agent.conf.json, then conf/orchestrator-agent.conf.json and "
        "orchestrator-agent.conf.json in the current directory; later files override "
        "earlier ones."
    )
    optParameters = [
        ["config", "c", None, "Configuration file (JSON, the original agent's format)."],
        ["port", "p", None, "HTTP port; overrides HTTPPort.", int],
    ]


def load_config(options) -> config_module.Config:
    """The configuration the options name; a bad one stops the daemon with its message."""
    overrides = {}
    if options["port"] is not None:
        overrides["http_port"] = options["port"]
    try:
        return config_module.load(
            options["config"], overrides=overrides,
            warn=lambda message: log.warn("{message}", message=message),
        )
    except ConfigError as e:
        raise SystemExit(f"orchestrator-agent: {e.message}") from None
    except OSError as e:
        raise SystemExit(f"orchestrator-agent: {e}") from None
