"""The twistd side of the daemon: command-line options and the service tree.

``twistd -n orchestrator-agent [--config FILE] [--port N]`` ends up in :func:`makeService`,
which builds the :class:`~orchagent.agent.Agent` and returns a MultiService holding the HTTP
server, the registration service and the seed manager.
"""

from __future__ import annotations

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.python import usage
from twisted.web import http, server

from orchagent import config as config_module
from orchagent.agent import build_agent
from orchagent.api.resource import AgentAPI
from orchagent.errors import ConfigError
from orchagent.logging import RootService, configured_observer, redact

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
    overrides = {}
    if options["port"] is not None:
        overrides["http_port"] = options["port"]
    return config_module.load(
        options["config"], overrides=overrides,
        warn=lambda message: log.warn("{message}", message=message),
    )


def http_endpoint(config, reactor):
    """The server endpoint of the API: TCP, or TLS when UseSSL (mutual with UseMutualTLS)."""
    interface = config.http_bind_address
    if config.use_ssl:
        from orchagent.api.tls import server_tls_options

        return endpoints.SSL4ServerEndpoint(
            reactor, config.http_port, server_tls_options(config), interface=interface)
    return endpoints.TCP4ServerEndpoint(reactor, config.http_port, interface=interface)


def redacted_access_log(timestamp, request) -> str:
    """The combined access-log line with every query value of ``token`` or ``key`` hidden."""
    line = http.combinedLogFormatter(timestamp, request)
    return redact(line)


def makeService(options, reactor=None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor
    try:
        config = load_config(options)
        agent = build_agent(config, reactor)
        endpoint = http_endpoint(config, reactor)
    except ConfigError as e:
        raise SystemExit(f"orchestrator-agent: {e.message}") from None
    except OSError as e:
        raise SystemExit(f"orchestrator-agent: {e}") from None
    if config.token_hint_file:
        agent.token.write_hint(config.token_hint_file)
    root = RootService(configured_observer(config, options))
    root.agent = agent
    site = server.Site(AgentAPI(agent).resource(), logFormatter=redacted_access_log)
    site.displayTracebacks = False
    http_service = StreamServerEndpointService(endpoint, site)
    # A port that can't be bound is fatal: an agent that runs without its API is worse
    # than one that visibly fails to start.
    http_service._raiseSynchronously = True
    http_service.setServiceParent(root)
    agent.registration.setServiceParent(root)
    agent.seeds.setServiceParent(root)
    log.info("orchestrator-agent for {hostname} on port {port}; config from {files}",
             hostname=agent.hostname, port=config.http_port,
             files=", ".join(config.source_files) or "defaults")
    return root
