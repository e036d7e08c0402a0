"""The orchestrator-agent v1 HTTP API (plus orchagent's extensions) as one Klein app.

Routes are methods of :class:`AgentAPI`; each one checks access, validates its input
through :mod:`orchagent.api.params` and hands the work to a component of the
:class:`~orchagent.agent.Agent`.  No handler holds logic of its own beyond that, and every
failure, ours or unexpected, leaves through :meth:`AgentAPI.agent_error` /
:meth:`AgentAPI.unexpected_error` as the v1 error body.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import EncodingResourceWrapper
from twisted.web.server import GzipEncoderFactory
from werkzeug.exceptions import HTTPException

from orchagent.api import connections, openapi, params
from orchagent.errors import AgentError, BadRequest, NotAvailable, NotFound
from orchagent.metrics import AgentMetrics
from orchagent.seed import usage
from orchagent.seed.state import refuse_while_receiving

log = Logger()

#: Largest request body accepted (apply-relaylog-contents carries gzip+base64 relay logs).
MAX_BODY_BYTES = 256 * 1024 * 1024


def error_body(message: str) -> bytes:
    return json.dumps({"Code": "ERROR", "Message": message, "Details": None}).encode()


def gzip_when_asked(resource):
    """``resource`` answering gzip-encoded when the request's Accept-Encoding names gzip,
    as the Go agent did (orchestrator always asks), plain otherwise.

    twisted.web applies the encoding only when this wrapper is the resource the Site's
    traversal ends at, so it must be the outermost (leaf) resource of the site."""
    factory = GzipEncoderFactory()
    factory.compressLevel = 6  # zlib's default, as Go's gzip.DefaultCompression
    return EncodingResourceWrapper(resource, [factory])


class AccessDenied(AgentError):
    """Missing or wrong token, or failed basic auth."""


class AgentAPI:
    """The HTTP face of one agent."""

    app = Klein()

    def __init__(self, agent):
        self.agent = agent
        self.config = agent.config
        self.metrics = AgentMetrics(agent)

    # --- plumbing ------------------------------------------------------------------------

    def resource(self):
        """The Klein app as a resource, counting every request for /metrics and answering
        gzip-encoded when the client accepts it (:func:`gzip_when_asked`)."""
        return gzip_when_asked(self.counted_resource())

    def counted_resource(self):
        """The Klein app as a resource, counting every request for /metrics."""
        return self.metrics.counting(self.app.resource(), self.app.url_map, self.config.status_endpoint)

    def _json(self, request, value, code: int = 200) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        return json.dumps(value).encode()

    def _check_basic_auth(self, request) -> None:
        user = self.config.http_auth_user
        if not user:
            return
        given_user = request.getUser() or b""
        given_password = request.getPassword() or b""
        ok_user = hmac.compare_digest(given_user, user.encode())
        ok_password = hmac.compare_digest(given_password, self.config.http_auth_password.encode())
        if not (ok_user and ok_password):
            request.setHeader(b"WWW-Authenticate", b'Basic realm="orchestrator-agent"')
            raise AccessDenied("Unauthorized")

    def _check_token(self, request) -> None:
        given = None
        values = request.args.get(b"token")
        if values:
            given = values[-1]
        header = self.config.token_http_header
        if given is None and header:
            given = request.getHeader(header.encode())
            if isinstance(given, str):
                given = given.encode()
        if not given or not self.agent.token.matches(given):
            raise AccessDenied("Invalid token")
        connections.trust(request)

    def _guard(self, request, token: bool = True) -> None:
        """Access checks every route makes first: basic auth, client OU, token."""
        self._check_basic_auth(request)
        self.agent.tls_guard(request)
        if token:
            self._check_token(request)

    # --- error mapping, one place --------------------------------------------------------

    @app.handle_errors(AgentError)
    def agent_error(self, request, failure: Failure):
        error = failure.value
        if isinstance(error, AccessDenied) and error.message == "Unauthorized":
            request.setResponseCode(401)
        else:
            request.setResponseCode(500)
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        return error_body(error.message)

    @app.handle_errors(HTTPException)
    def http_error(self, request, failure: Failure):
        error = failure.value
        code = getattr(error, "code", 500) or 500
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        if code == 404:
            return error_body(f"no such endpoint: {request.path.decode('utf-8', 'replace')}")
        return error_body(error.description or error.name)

    @app.handle_errors(Exception)
    def unexpected_error(self, request, failure: Failure):
        log.failure("unexpected error serving {path}", failure, path=request.path)
        request.setResponseCode(500)
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        return error_body(f"internal error: {failure.getErrorMessage() or failure.type.__name__}")

    # --- identity and health -------------------------------------------------------------

    @app.route("/api/hostname", methods=["GET"])
    def hostname(self, request):
        self._guard(request, token=False)
        return self._json(request, self.agent.hostname)

    @app.route("/metrics", methods=["GET"])
    def metrics_exposition(self, request):
        """Prometheus scrape; the token is required unless MetricsOpen."""
        self._guard(request, token=not self.config.metrics_open)
        body, content_type = self.metrics.exposition(request.getHeader(b"Accept"))
        request.setHeader(b"Content-Type", content_type.encode())
        return body

    @app.route("/api/openapi.json", methods=["GET"])
    def openapi_document(self, request):
        """This API's description; public like /api/hostname (basic auth and OUs still apply)."""
        self._guard(request, token=False)
        return self._json(request, openapi.document(self.config))

    @app.route("/", branch=True, methods=["GET"])
    def status_or_unknown(self, request):
        """The configurable StatusEndpoint, else a 404 in the v1 error shape."""
        if request.path.decode("utf-8", "replace").rstrip("/") == self.config.status_endpoint.rstrip("/"):
            self._check_basic_auth(request)
            if self.config.status_ou_verify:
                self.agent.tls_guard(request)
            healthy = self.agent.registration.is_healthy()
            return self._json(request, "OK" if healthy else "BAD", 200 if healthy else 500)
        request.setResponseCode(404)
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        return error_body(f"no such endpoint: {request.path.decode('utf-8', 'replace')}")

    # --- snapshots -------------------------------------------------------------------------

    @app.route("/api/lvs", methods=["GET"])
    async def lvs(self, request):
        self._guard(request)
        volumes = await self.agent.snapshots.list_volumes("")
        return self._json(request, [v.to_json() for v in volumes])

    @app.route("/api/lvs/<pattern>", methods=["GET"])
    async def lvs_matching(self, request, pattern):
        self._guard(request)
        volumes = await self.agent.snapshots.list_volumes(params.text(pattern, "pattern"))
        return self._json(request, [v.to_json() for v in volumes])

    @app.route("/api/lvs-snapshots", methods=["GET"])
    async def lvs_snapshots(self, request):
        self._guard(request)
        volumes = await self.agent.snapshots.list_snapshots()
        return self._json(request, [v.to_json() for v in volumes])

    @app.route("/api/lv", methods=["GET"])
    async def lv_by_query(self, request):
        self._guard(request)
        return await self._one_volume(request, params.volume_name(params.query(request, "lv")))

    @app.route("/api/lv/<path:lv>", methods=["GET"])
    async def lv_by_path(self, request, lv):
        self._guard(request)
        return await self._one_volume(request, params.volume_name(lv))

    async def _one_volume(self, request, name):
        volume = await self.agent.snapshots.get_volume(name)
        return self._json(request, [volume.to_json()])

    @app.route("/api/mount", methods=["GET"])
    async def mount(self, request):
        self._guard(request)
        state = await self.agent.snapshots.mount_state()
        return self._json(request, state.to_json())

    @app.route("/api/mountlv", methods=["GET"])
    async def mountlv(self, request):
        self._guard(request)
        name = params.volume_name(params.query(request, "lv"))
        state = await self.agent.snapshots.mount(name)
        return self._json(request, state.to_json())

    @app.route("/api/umount", methods=["GET"])
    async def umount(self, request):
        self._guard(request)
        state = await self.agent.snapshots.unmount()
        return self._json(request, state.to_json())

    @app.route("/api/removelv", methods=["GET"])
    async def removelv(self, request):
        self._guard(request)
        name = params.volume_name(params.query(request, "lv"))
        return self._json(request, bool(await self.agent.snapshots.remove(name)))

    @app.route("/api/create-snapshot", methods=["GET"])
    async def create_snapshot(self, request):
        self._guard(request)
        return self._json(request, bool(await self.agent.snapshots.create_snapshot()))

    @app.route("/api/restore-snapshot", methods=["GET"])
    async def restore_snapshot(self, request):
        self._guard(request)
        self._refuse_while_receiving("restore a snapshot over the datadir")
        name = params.volume_name(params.query(request, "lv"))
        return self._json(request, bool(await self.agent.snapshots.restore(name)))

    @app.route("/api/backups", methods=["GET"])
    async def backups(self, request):
        """mariabackup/xtrabackup backups of BackupDirectories, newest first (orchagent's)."""
        self._guard(request)
        return self._json(request, [b.to_json() for b in await self.agent.backups.list()])

    @app.route("/api/available-snapshots-local", methods=["GET"])
    async def available_snapshots_local(self, request):
        self._guard(request)
        return self._json(request, list(await self.agent.snapshot_hosts.local()))

    @app.route("/api/available-snapshots", methods=["GET"])
    async def available_snapshots(self, request):
        self._guard(request)
        return self._json(request, list(await self.agent.snapshot_hosts.anywhere()))

    @app.route("/api/datacenter", methods=["GET"])
    def datacenter(self, request):
        self._guard(request)
        return self._json(request, self.config.datacenter)

    # --- MySQL host facts and service --------------------------------------------------

    @app.route("/api/du", methods=["GET"])
    async def du(self, request):
        self._guard(request)
        path = params.absolute_path(params.query(request, "path"))
        return self._json(request, await self.agent.host.disk_usage(path))

    @app.route("/api/mysql-du", methods=["GET"])
    async def mysql_du(self, request):
        self._guard(request)
        return self._json(request, await usage.mysql_disk_usage(self.agent.host, self.agent.seeds))

    @app.route("/api/mysql-datadir-available-space", methods=["GET"])
    async def mysql_datadir_available_space(self, request):
        self._guard(request)
        return self._json(request, await self.agent.host.datadir_available_space())

    @app.route("/api/mysql-error-log-tail", methods=["GET"])
    async def mysql_error_log_tail(self, request):
        self._guard(request)
        return self._json(request, list(await self.agent.host.error_log_tail()))

    @app.route("/api/mysql-port", methods=["GET"])
    async def mysql_port(self, request):
        self._guard(request)
        return self._json(request, await self.agent.host.port())

    @app.route("/api/mysql-status", methods=["GET"])
    async def mysql_status(self, request):
        self._guard(request)
        return self._json(request, bool(await self.agent.service.is_running()))

    @app.route("/api/mysql-stop", methods=["GET"])
    async def mysql_stop(self, request):
        self._guard(request)
        return self._json(request, bool(await self.agent.service.stop()))

    @app.route("/api/mysql-start", methods=["GET"])
    async def mysql_start(self, request):
        self._guard(request)
        self._refuse_while_receiving("start MySQL")
        started = bool(await self.agent.service.start())
        if started and self.agent.replication is not None:
            await self.agent.replication.after_start(self.agent.seeds.all_status())
        return self._json(request, started)

    @app.route("/api/replication-status", methods=["GET"])
    async def replication_status(self, request):
        """The seeded server's replication (orchagent.replica.control)."""
        self._guard(request)
        if self.agent.replication is None:
            raise NotAvailable("replication control is not available on this agent")
        return self._json(request, await self.agent.replication.status())

    @app.route("/api/start-replication/<seed_id>", methods=["GET"])
    async def start_replication(self, request, seed_id):
        """Point the seeded server at the named seed's master, once (orchagent seed
        --replicate); then the replication status."""
        self._guard(request)
        if self.agent.replication is None:
            raise NotAvailable("replication control is not available on this agent")
        return self._json(request, await self.agent.replication.start(
            params.seed_id(seed_id), self.agent.seeds.all_status()))

    def _refuse_while_receiving(self, action: str) -> None:
        refuse_while_receiving(self.agent.seeds.all_status(), action)

    @app.route("/api/delete-mysql-datadir", methods=["GET"])
    async def delete_mysql_datadir(self, request):
        self._guard(request)
        self._refuse_while_receiving("empty the datadir")
        return self._json(request, bool(await self.agent.host.delete_datadir()))

    @app.route("/api/post-copy", methods=["GET"])
    @app.route("/api/post-copy/", methods=["GET"])
    async def post_copy(self, request):
        self._guard(request)
        self._refuse_while_receiving("run post-copy")
        source = params.query(request, "sourceHost", required=False)
        if source is not None:
            source = params.host(source, "sourceHost")
        return self._json(request, bool(await self.agent.host.post_copy(source)))

    # --- seeds ---------------------------------------------------------------------------

    @app.route("/api/receive-mysql-seed-data/<seed_id>", methods=["GET"])
    async def receive_seed(self, request, seed_id):
        self._guard(request)
        seed = params.seed_id(seed_id)
        key = params.query(request, "key", required=False)
        return self._json(request, bool(await self.agent.seeds.receive(seed, key=key)))

    @app.route("/api/send-mysql-seed-data/<target>/<seed_id>", methods=["GET"])
    async def send_seed(self, request, target, seed_id):
        self._guard(request)
        target = params.host(target)
        seed = params.seed_id(seed_id)
        key = params.query(request, "key", required=False)
        source = params.query(request, "source", required=False) or "snapshot"
        if source not in ("snapshot", "datadir", "hot"):
            raise BadRequest(f"parameter source must be snapshot, datadir or hot, not {source!r}")
        return self._json(request, bool(await self.agent.seeds.send(target, seed, key=key, source=source)))

    @app.route("/api/abort-seed/<seed_id>", methods=["GET"])
    async def abort_seed(self, request, seed_id):
        self._guard(request)
        await self.agent.seeds.abort(params.seed_id(seed_id))
        return self._json(request, True)

    @app.route("/api/seed-command-completed/<seed_id>", methods=["GET"])
    async def seed_completed(self, request, seed_id):
        self._guard(request)
        return self._json(request, bool(await self.agent.seeds.completed(params.seed_id(seed_id))))

    @app.route("/api/seed-command-succeeded/<seed_id>", methods=["GET"])
    async def seed_succeeded(self, request, seed_id):
        self._guard(request)
        return self._json(request, bool(await self.agent.seeds.succeeded(params.seed_id(seed_id))))

    @app.route("/api/seeds", methods=["GET"])
    def seeds(self, request):
        """Every seed this agent knows (running and recently ended), for controllers."""
        self._guard(request)
        return self._json(request, list(self.agent.seeds.all_status()))

    @app.route("/api/seed-status/<seed_id>", methods=["GET"])
    async def seed_status(self, request, seed_id):
        self._guard(request)
        return self._json(request, await self.agent.seeds.status(params.seed_id(seed_id)))

    @app.route("/api/seed-rate-limit/<seed_id>", methods=["GET"])
    async def seed_rate_limit(self, request, seed_id):
        self._guard(request)
        seed = params.seed_id(seed_id)
        limit = params.non_negative_int(params.query(request, "bytesPerSec"), "bytesPerSec")
        return self._json(request, bool(await self.agent.seeds.set_rate_limit(seed, limit)))

    # --- relay logs and binlogs ----------------------------------------------------------

    @app.route("/api/mysql-relay-log-index-file", methods=["GET"])
    async def relay_log_index_file(self, request):
        self._guard(request)
        return self._json(request, await self.agent.binlogs.relay_log_index_file())

    @app.route("/api/mysql-relay-log-files", methods=["GET"])
    async def relay_log_files(self, request):
        self._guard(request)
        return self._json(request, list(await self.agent.binlogs.relay_log_files()))

    @app.route("/api/mysql-relay-log-end-coordinates", methods=["GET"])
    async def relay_log_end_coordinates(self, request):
        self._guard(request)
        return self._json(request, await self.agent.binlogs.relay_log_end_coordinates())

    def _binlog_range(self, request):
        names = params.query_list(request, "binlog")
        if not names:
            raise BadRequest("missing parameter binlog")
        start = params.query(request, "start", required=False)
        stop = params.query(request, "stop", required=False)
        start = params.non_negative_int(start, "start") if start is not None else 0
        stop = params.non_negative_int(stop, "stop") if stop is not None else 0
        return names, start, stop

    @app.route("/api/mysql-binlog-contents", methods=["GET"])
    async def binlog_contents(self, request):
        self._guard(request)
        names, start, stop = self._binlog_range(request)
        return self._json(request, await self.agent.binlogs.binlog_contents(names, start, stop))

    @app.route("/api/mysql-binlog-binary-contents", methods=["GET"])
    async def binlog_binary_contents(self, request):
        self._guard(request)
        names, start, stop = self._binlog_range(request)
        return self._json(request, await self.agent.binlogs.binlog_binary_contents(names, start, stop))

    @app.route("/api/mysql-relaylog-contents-tail/<relaylog>/<start>", methods=["GET"])
    async def relaylog_contents_tail(self, request, relaylog, start):
        self._guard(request)
        offset = params.non_negative_int(start, "start")
        return self._json(request, await self.agent.binlogs.relaylog_contents_tail(params.text(relaylog, "relaylog"), offset))

    @app.route("/api/apply-relaylog-contents", methods=["POST"])
    async def apply_relaylog_contents(self, request):
        self._guard(request)
        body = request.content.read(MAX_BODY_BYTES + 1)
        if len(body) > MAX_BODY_BYTES:
            raise BadRequest(f"request body larger than {MAX_BODY_BYTES} bytes")
        if not body.strip():
            raise BadRequest("empty request body: expected gzip+base64 relay log contents")
        try:
            payload = base64.b64decode(b"".join(body.split()), validate=True)  # Go agents wrap lines
        except (binascii.Error, ValueError):
            raise BadRequest("request body is not valid base64") from None
        await self.agent.binlogs.apply_relaylog_contents(payload)
        return self._json(request, "OK")

    # --- custom commands -----------------------------------------------------------------

    @app.route("/api/custom-commands/<path:cmd>", methods=["GET"])
    async def custom_command(self, request, cmd):
        """Any name reaches the name check (a ``/`` in it too, which a plain segment rule
        would turn into a 404), so a bad one is the v1 error naming it."""
        self._guard(request)
        name = params.command_name(cmd)
        command = self.config.custom_commands.get(name)
        if command is None:
            raise NotFound(f"unknown custom command {name!r}")
        result = await self.agent.runner.shell(command)
        return self._json(request, {"Code": "OK", "Message": result.stdout.decode("utf-8", "replace"), "Details": None})
