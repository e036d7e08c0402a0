"""The daemon's service tree.

``twistd -n orchestrator-agent`` comes in through :mod:`orchagent.tap`, which reads the
configuration and calls :func:`build_service`: it builds the
:class:`~orchagent.agent.Agent` and returns a MultiService holding the HTTP server, the
registration service and the seed manager.
"""

from __future__ import annotations

import gc

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from orchagent import config as config_module
from orchagent.agent import build_agent
from orchagent.api.connections import ReservedSite
from orchagent.api.resource import MAX_BODY_BYTES, AgentAPI, error_body, gzip_when_asked
from orchagent.errors import AgentError, ConfigError
from orchagent.logging import RootService, configured_observer, redact
from orchagent.snapshots.restore import RecoveryService
from orchagent.options import load_config

log = Logger()

#: Seconds a client connection may stay silent before it is closed (slow or dead clients
#: hold a socket each; they never hold up other clients, the reactor serves everyone).
HTTP_IDLE_TIMEOUT = 60


class BoundedRequest(server.Request):
    """A request whose body may not exceed MAX_BODY_BYTES.

    twisted.web spools any body to a temp file before the resource sees it, so without a
    bound a client could fill the disk or, through the handler, the memory.  A body
    announced too large, or found too large while it arrives, is discarded unread and
    answered with 413 and the v1 error body; the resource is never called.
    """

    max_body = MAX_BODY_BYTES

    def gotLength(self, length):
        self._body_seen = 0
        self._too_large = length is not None and length > self.max_body
        super().gotLength(0 if self._too_large else length)

    def handleContentChunk(self, data):
        self._body_seen += len(data)
        if not self._too_large and self._body_seen > self.max_body:
            self._too_large = True
            self.content.seek(0)
            self.content.truncate()
        if self._too_large:
            if self._body_seen > 2 * self.max_body:
                self.channel.transport.abortConnection()
            return
        super().handleContentChunk(data)

    def process(self):
        self.orchagent_processing = True  # not closed to make room (api.connections)
        if getattr(self, "_too_large", False):
            self.setResponseCode(413)
            self.setHeader(b"Content-Type", b"application/json; charset=utf-8")
            self.setHeader(b"Connection", b"close")
            self.write(error_body(f"request body larger than {self.max_body} bytes"))
            self.finish()
            return
        super().process()


class StatusFastPath(Resource):
    """The site's root: a GET of exactly StatusEndpoint goes straight to the API's status
    handler, everything else to the Klein app.

    The status endpoint is the health check: the request monitors and load balancers send
    most, and under a flood of them Klein's routing (every rule is tried before the
    catch-all that serves it) was a quarter of the API's CPU.  The answer, its error
    mapping and its count in /metrics are the app's own (same handler, same error
    handlers); other spellings of the path (a trailing slash) take the app's way.
    """

    isLeaf = True

    def __init__(self, api: AgentAPI, app: Resource):
        super().__init__()
        self.api = api
        self.app = app
        self.label = api.config.status_endpoint
        self.path = self.label.encode()

    def render(self, request):
        if request.method != b"GET" or request.path != self.path:
            return self.app.render(request)
        try:
            body = self.api.status_or_unknown(request)
        except AgentError:
            body = self.api.agent_error(request, Failure())
        except Exception:
            body = self.api.unexpected_error(request, Failure())
        self.api.metrics.count_request(self.label, "GET", request.code)
        return body


class ChildrenService(service.Service):
    """Stops the command runner's children still running when the agent stops (a custom
    command, a service command that hangs): each is its own process group, which would
    otherwise outlive the agent."""

    name = "children"

    def __init__(self, runner):
        self.runner = runner

    def stopService(self):
        stop_all = getattr(self.runner, "stop_all", None)
        if stop_all is not None:
            stop_all()
        return super().stopService()


class HeapFreeze(service.Service):
    """Once the daemon has started, moves every object alive into the garbage collector's
    permanent generation (``gc.freeze``).

    A full collection walks every tracked object, and the startup heap (modules, classes,
    the app, the configuration) is most of them and lives as long as the process.  Under a
    flood of API requests full collections came every second or two and were the API's
    longest pauses (up to ~40 ms each, added to every request in flight); with the startup
    heap frozen they are rare and short.  Added last, so it runs after the other services
    started.
    """

    name = "heap-freeze"

    def startService(self):
        super().startService()
        gc.freeze()

    def stopService(self):
        gc.unfreeze()  # an agent built in a longer-lived process (tests) gives them back
        return super().stopService()


def bounded_site(resource, reactor=None) -> server.Site:
    """The API's Site: bounded bodies, an idle timeout, no tracebacks, redacted access log,
    and descriptors kept for token-authenticated callers (:mod:`orchagent.api.connections`)."""
    site = ReservedSite(resource, logFormatter=redacted_access_log, timeout=HTTP_IDLE_TIMEOUT,
                        reactor=reactor)
    site.requestFactory = BoundedRequest
    site.displayTracebacks = False
    return site


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
    """The daemon's service tree from parsed :class:`~orchagent.options.Options` (tests build
    it in their process; twistd comes through :func:`orchagent.tap.makeService`)."""
    return build_service(load_config(options), options, reactor)


def build_service(config: config_module.Config, options, reactor=None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor
    try:
        agent = build_agent(config, reactor)
        endpoint = http_endpoint(config, reactor)
        if config.token_hint_file:
            agent.token.write_hint(config.token_hint_file)
    except ConfigError as e:
        raise SystemExit(f"orchestrator-agent: {e.message}") from None
    except OSError as e:
        raise SystemExit(f"orchestrator-agent: {e}") from None
    root = RootService(configured_observer(config, options))
    root.agent = agent
    api = AgentAPI(agent)
    site = bounded_site(gzip_when_asked(StatusFastPath(api, api.counted_resource())), reactor)
    ChildrenService(agent.runner).setServiceParent(root)
    RecoveryService(agent.snapshots.recover).setServiceParent(root)
    http_service = StreamServerEndpointService(endpoint, site)
    # A port that can't be bound is fatal: an agent that runs without its API is worse
    # than one that visibly fails to start.
    http_service._raiseSynchronously = True
    http_service.setServiceParent(root)
    agent.registration.setServiceParent(root)
    agent.seeds.setServiceParent(root)
    HeapFreeze().setServiceParent(root)
    log.info("orchestrator-agent for {hostname} on port {port}; config from {files}",
             hostname=agent.hostname, port=config.http_port,
             files=", ".join(config.source_files) or "defaults")
    return root
