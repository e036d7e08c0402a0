"""Configuration: the original orchestrator-agent JSON format, plus orchagent's own keys.

The file format is the Go agent's: one JSON object with PascalCase keys.  Every key the
original knows keeps its name and default, so an operator's existing
``/etc/orchestrator-agent.conf.json`` works unchanged.  Keys orchagent adds are marked
``ours`` in :data:`FIELDS` and documented in docs/configuration.md.

Loading is strict where a mistake would hurt (a wrong type, an unreadable file: the daemon
refuses to start, naming file and key) and lenient where the original was (an unknown key
is a warning, so a config carrying the original's extra keys still starts).
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Callable, Iterable

import attrs

from orchagent.errors import ConfigError

#: Where the original agent looks when no ``--config`` is given; every file that exists is
#: read in this order and a later one overrides keys of an earlier one.
DEFAULT_SEARCH_PATH = (
    "/etc/orchestrator-agent.conf.json",
    "conf/orchestrator-agent.conf.json",
    "orchestrator-agent.conf.json",
)


@attrs.frozen
class Field:
    key: str
    attr: str
    kind: type
    default: Any
    ours: bool
    doc: str
    item: type | None = None


def _f(key, attr, kind, default, doc, ours=False, item=None) -> Field:
    return Field(key, attr, kind, default, ours, doc, item)


FIELDS: tuple[Field, ...] = (
    # --- the original's keys -------------------------------------------------------------
    _f("SnapshotMountPoint", "snapshot_mount_point", str, "", "The one agreed mount point for snapshots."),
    _f("ContinuousPollSeconds", "continuous_poll_seconds", int, 60, "Seconds between agent-ping calls to orchestrator."),
    _f("ResubmitAgentIntervalMinutes", "resubmit_agent_interval_minutes", int, 60, "Minutes between submit-agent calls."),
    _f("CreateSnapshotCommand", "create_snapshot_command", str, "", "Shell command that creates a snapshot; wins over the built-in backend."),
    _f("AvailableLocalSnapshotHostsCommand", "available_local_snapshot_hosts_command", str, "", "Shell command printing hosts with snapshots in this datacenter, one per line."),
    _f("AvailableSnapshotHostsCommand", "available_snapshot_hosts_command", str, "", "Shell command printing hosts with snapshots anywhere, one per line."),
    _f("SnapshotVolumesFilter", "snapshot_volumes_filter", str, "", "Text a volume name must contain to count as a snapshot."),
    _f("MySQLDatadirCommand", "mysql_datadir_command", str, "", "Shell command printing the datadir; empty = read the MySQL option files."),
    _f("MySQLPortCommand", "mysql_port_command", str, "", "Shell command printing the MySQL port; empty = read the MySQL option files."),
    _f("MySQLDeleteDatadirContentCommand", "mysql_delete_datadir_content_command", str, "", "Shell command emptying the datadir; empty = built in."),
    _f("MySQLServiceStopCommand", "mysql_service_stop_command", str, "", "Shell command stopping MySQL; empty = systemctl stop of the detected unit."),
    _f("MySQLServiceStartCommand", "mysql_service_start_command", str, "", "Shell command starting MySQL; empty = systemctl start of the detected unit."),
    _f("MySQLServiceStatusCommand", "mysql_service_status_command", str, "", "Shell command exiting 0 when MySQL runs; empty = systemctl is-active."),
    _f("ReceiveSeedDataCommand", "receive_seed_data_command", str, "", "Original command mode for receiving a seed (args: datadir, port)."),
    _f("SendSeedDataCommand", "send_seed_data_command", str, "", "Original command mode for sending a seed (args: source dir, target host, port)."),
    _f("PostCopyCommand", "post_copy_command", str, "", "Shell command run after a seed copy, before MySQL starts."),
    _f("MySQLClientCommand", "mysql_client_command", str, "mysql", "The mysql client command used to apply relay logs."),
    _f("AgentsServer", "agents_server", str, "", "orchestrator's agents server URL; empty = standalone."),
    _f("AgentsServerPort", "agents_server_port", str, "", "Port appended to AgentsServer, e.g. ':3001'."),
    _f("HTTPPort", "http_port", int, 3002, "Port of the agent's HTTP API."),
    _f("HTTPAuthUser", "http_auth_user", str, "", "Basic auth user; empty disables basic auth."),
    _f("HTTPAuthPassword", "http_auth_password", str, "", "Basic auth password."),
    _f("UseSSL", "use_ssl", bool, False, "Serve HTTPS with SSLCertFile/SSLPrivateKeyFile."),
    _f("UseMutualTLS", "use_mutual_tls", bool, False, "Require client certificates signed by SSLCAFile."),
    _f("SSLSkipVerify", "ssl_skip_verify", bool, False, "Do not verify orchestrator's certificate (loudly)."),
    _f("SSLPrivateKeyFile", "ssl_private_key_file", str, "", "PEM private key for HTTPS and client TLS."),
    _f("SSLCertFile", "ssl_cert_file", str, "", "PEM certificate for HTTPS and client TLS."),
    _f("SSLCAFile", "ssl_ca_file", str, "", "PEM CA bundle: trust root for orchestrator and client certificates."),
    _f("SSLValidOUs", "ssl_valid_ous", list, [], "Client certificate OUs accepted under mutual TLS; empty = any.", item=str),
    _f("StatusEndpoint", "status_endpoint", str, "/api/status", "Path of the status endpoint."),
    _f("StatusOUVerify", "status_ou_verify", bool, False, "Apply the OU check to the status endpoint too."),
    _f("StatusBadSeconds", "status_bad_seconds", int, 300, "Status is BAD when the last good ping is older than this."),
    _f("HttpTimeoutSeconds", "http_timeout_seconds", int, 10, "Timeout of HTTP calls to orchestrator."),
    _f("ExecWithSudo", "exec_with_sudo", bool, False, "Prefix privileged built-in commands with 'sudo -n'."),
    _f("CustomCommands", "custom_commands", dict, {}, "Map of name to shell command for /api/custom-commands/{name}.", item=str),
    _f("TokenHintFile", "token_hint_file", str, "", "File the token is written to (mode 0600)."),
    _f("TokenHttpHeader", "token_http_header", str, "", "HTTP header also accepted as the token."),
    # --- orchagent's keys ----------------------------------------------------------------
    _f("AgentHostname", "agent_hostname", str, "", "Name submitted to orchestrator and returned by /api/hostname; empty = the kernel's host name (uname -n), as the Go agent.", ours=True),
    _f("HTTPBindAddress", "http_bind_address", str, "", "Address the API listens on; empty = all.", ours=True),
    _f("TokenFile", "token_file", str, "", "Read the token from this file instead of making a random one.", ours=True),
    _f("CommandTimeoutSeconds", "command_timeout_seconds", int, 300, "Time limit of one OS command; the process group is killed after it.", ours=True),
    _f("ToolStallSeconds", "tool_stall_seconds", int, 600, "The backup tools that run as long as they need (mariabackup --prepare, --decompress, the copies and checks of a backup's work copy, a hot seed's prepare on the target) are stopped, and their step fails, once their process group used no CPU time and did no I/O for this long: they hung. 0 = never.", ours=True),
    _f("MySQLOptionsFile", "mysql_options_file", str, "", "MySQL option file to read instead of /etc/mysql/my.cnf and /etc/my.cnf.", ours=True),
    _f("MySQLServiceName", "mysql_service_name", str, "", "systemd unit for the built-in service commands; empty = mariadb or mysql, whichever exists.", ours=True),
    _f("SnapshotBackend", "snapshot_backend", str, "auto", "lvm, btrfs, copy or auto (by the datadir's file system).", ours=True),
    _f("SnapshotDirectory", "snapshot_directory", str, "", "Where btrfs and copy snapshots are kept.", ours=True),
    _f("LVMSnapshotSize", "lvm_snapshot_size", str, "10G", "Size of an LVM snapshot's copy-on-write area (lvcreate --size).", ours=True),
    _f("Datacenter", "datacenter", str, "", "This host's datacenter.", ours=True),
    _f("SnapshotInventoryFile", "snapshot_inventory_file", str, "", "JSON inventory of hosts with snapshots (see README).", ours=True),
    _f("SeedTransferPort", "seed_transfer_port", int, 21234, "TCP port a receiving agent listens on during a seed.", ours=True),
    _f("StateDir", "state_dir", str, "/var/lib/orchestrator-agent", "Where seed state persists across restarts.", ours=True),
    _f("SeedCompression", "seed_compression", str, "auto", "auto, zstd or none.", ours=True),
    _f("SeedVerifyOnDisk", "seed_verify_on_disk", str, "auto", "Before a received seed replaces the datadir, read every staged byte back and check it against the digest it arrived with: on, off, or auto (when the seed was interrupted and resumed: its staged data outlived a connection or a restart). Missing or resized staged files always fail the seed.", ours=True),
    _f("SeedVerifyStart", "seed_verify_start", str, "auto", "Before a received seed replaces the datadir, start a throwaway server on the staged copy (the host's option files, its own socket, no networking, no replication, no event scheduler): InnoDB recovers, the system tables and a sample of user tables are read, the replication position is recorded, and it shuts down cleanly; a copy that fails is never promoted. on, off, or auto (when the server binary, mariadbd or mysqld, is installed and the staged tree holds the server's system tables).", ours=True),
    _f("SeedStartReplication", "seed_start_replication", bool, False, "When MySQL is started on a seeded datadir (mysql-start), point it at the master of the newest completed received seed (its Replication coordinates: GTID where the copy has one, else file and position) and start replication, through MySQLClientCommand; /api/replication-status reports it.", ours=True),
    _f("ReplicationCredentialsFile", "replication_credentials_file", str, "", "Client option file whose [client] user and password replication uses when the seeded copy's master.info has none (a primary's copy).", ours=True),
    _f("SeedStreams", "seed_streams", int, 2, "Parallel TCP connections per seed.", ours=True),
    _f("SeedRateLimitBytesPerSec", "seed_rate_limit_bytes_per_sec", int, 0, "Seed bandwidth limit; 0 = none.", ours=True),
    _f("SeedBindAddress", "seed_bind_address", str, "", "Address the seed port listens on (only while this host receives a seed); empty = all, as a seed comes from another host.", ours=True),
    _f("SeedAllowedNetworks", "seed_allowed_networks", list, [], "Source networks accepted for unauthenticated (plain v1) seeds.", ours=True, item=str),
    _f("OrchestratorURL", "orchestrator_url", str, "", "orchestrator's own API (where it listens, e.g. http://orch:3000; user:password@ for basic auth), asked for the source host of a plain v1 seed: only that host may send it; empty = SeedAllowedNetworks decides.", ours=True),
    _f("SeedTLSCertFile", "seed_tls_cert_file", str, "", "Certificate for mutual TLS between agents on the seed port.", ours=True),
    _f("SeedTLSKeyFile", "seed_tls_key_file", str, "", "Private key for seed TLS.", ours=True),
    _f("SeedTLSCAFile", "seed_tls_ca_file", str, "", "CA that signs the peer agents' seed certificates.", ours=True),
    _f("SeedEngineProcess", "seed_engine_process", bool, True, "Run seeds in a child process of their own, so API load cannot starve them; false = in the agent's process.", ours=True),
    _f("MetricsOpen", "metrics_open", bool, False, "Serve /metrics without token.", ours=True),
    _f("LogFormat", "log_format", str, "text", "text or json (JSON lines).", ours=True),
    _f("BackupDirectories", "backup_directories", list, [], "Directories whose subdirectories holding a mariabackup/xtrabackup backup serve as snapshots.", ours=True, item=str),
    _f("HotBackupCommand", "hot_backup_command", str, "", "Shell command writing a hot backup into the directory given as its argument (prepared on the source, then sent like a snapshot); empty = mariabackup or xtrabackup --backup --stream=xbstream, streamed to the target while it is made.", ours=True),
)

_BY_KEY = {f.key: f for f in FIELDS}


def _make_config_class():
    fields = {}
    for f in FIELDS:
        if isinstance(f.default, (list, dict)):
            default = attrs.Factory(type(f.default))
        else:
            default = f.default
        fields[f.attr] = attrs.field(default=default)
    fields["source_files"] = attrs.field(factory=tuple)
    return attrs.make_class(
        "Config",
        fields,
        frozen=True,
        slots=True,
    )


Config = _make_config_class()
Config.__doc__ = """The agent's whole configuration, immutable; passed down, never global.

``source_files`` names the files it was read from, for messages."""
Config.__module__ = __name__


def _check_type(path: str, field: Field, value: Any) -> Any:
    where = f"{path}: key {field.key}"
    if field.kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, not {value!r}")
        return value
    if field.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, not {value!r}")
        if value < 0:
            raise ConfigError(f"{where} must not be negative, not {value!r}")
        return value
    if field.kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, not {value!r}")
        return value
    if field.kind is list:
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, field.item) for v in value):
            raise ConfigError(f"{where} must be a list of strings, not {value!r}")
        return list(value)
    if field.kind is dict:
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, field.item) for k, v in value.items()
        ):
            raise ConfigError(f"{where} must be an object of strings, not {value!r}")
        return dict(value)
    raise AssertionError(field)


def parse_file(path: str, warn: Callable[[str], None]) -> dict[str, Any]:
    """Read one JSON config file into ``{attr: value}``, checking every known key's type."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read configuration: {e.strerror}") from e
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the configuration must be a JSON object")
    values: dict[str, Any] = {}
    for key, value in doc.items():
        field = _BY_KEY.get(key)
        if field is None:
            warn(f"{path}: unknown configuration key {key!r} ignored")
            continue
        values[field.attr] = _check_type(path, field, value)
    return values


def load(
    path: str | None = None,
    search_path: Iterable[str] = DEFAULT_SEARCH_PATH,
    overrides: dict[str, Any] | None = None,
    warn: Callable[[str], None] = lambda msg: None,
) -> Config:
    """Build the configuration.

    With ``path``, exactly that file is read and must exist.  Without it, every existing
    file of ``search_path`` is read in order (as the original agent did); none at all
    means all defaults.  ``overrides`` (``{attr: value}``, from the command line) win.
    """
    values: dict[str, Any] = {}
    files: list[str] = []
    if path is not None:
        candidates = [path]
    else:
        candidates = [p for p in search_path if os.path.exists(p)]
    for candidate in candidates:
        values.update(parse_file(candidate, warn))
        files.append(candidate)
    values.update(overrides or {})
    config = Config(**values, source_files=tuple(files))
    validate(config)
    return config


def validate(config: Config) -> None:
    """Cross-key checks that make a configuration unusable."""
    where = ", ".join(config.source_files) or "configuration"
    if not 0 < config.http_port < 65536:
        raise ConfigError(f"{where}: key HTTPPort must be a TCP port, not {config.http_port}")
    if not 0 < config.seed_transfer_port < 65536:
        raise ConfigError(f"{where}: key SeedTransferPort must be a TCP port, not {config.seed_transfer_port}")
    if config.use_ssl and not (config.ssl_cert_file and config.ssl_private_key_file):
        raise ConfigError(f"{where}: UseSSL needs SSLCertFile and SSLPrivateKeyFile")
    if config.use_mutual_tls and not config.ssl_ca_file:
        raise ConfigError(f"{where}: UseMutualTLS needs SSLCAFile")
    if config.snapshot_backend not in ("auto", "lvm", "btrfs", "copy"):
        raise ConfigError(f"{where}: key SnapshotBackend must be auto, lvm, btrfs or copy, not {config.snapshot_backend!r}")
    if config.seed_compression not in ("auto", "zstd", "none"):
        raise ConfigError(f"{where}: key SeedCompression must be auto, zstd or none, not {config.seed_compression!r}")
    if config.seed_verify_on_disk not in ("auto", "on", "off"):
        raise ConfigError(f"{where}: key SeedVerifyOnDisk must be auto, on or off, not {config.seed_verify_on_disk!r}")
    if config.seed_verify_start not in ("auto", "on", "off"):
        raise ConfigError(f"{where}: key SeedVerifyStart must be auto, on or off, not {config.seed_verify_start!r}")
    if config.log_format not in ("text", "json"):
        raise ConfigError(f"{where}: key LogFormat must be text or json, not {config.log_format!r}")
    if config.seed_streams < 1:
        raise ConfigError(f"{where}: key SeedStreams must be at least 1")
    if not config.status_endpoint.startswith("/"):
        raise ConfigError(f"{where}: key StatusEndpoint must start with '/'")
    if config.orchestrator_url and not config.orchestrator_url.lower().startswith(("http://", "https://")):
        raise ConfigError(f"{where}: key OrchestratorURL must start with http:// or https://")
    if config.command_timeout_seconds < 1:
        raise ConfigError(f"{where}: key CommandTimeoutSeconds must be at least 1")


def agents_server_url(config: Config) -> str:
    """orchestrator's agents-server base URL: ``AgentsServer`` + ``AgentsServerPort``."""
    return (config.agents_server + config.agents_server_port).rstrip("/")


def agents_server_over_https(config: Config) -> bool:
    """Whether orchestrator's agents server is reached over HTTPS."""
    return agents_server_url(config).lower().startswith("https:")


def orchestrator_over_https(config: Config) -> bool:
    """Whether orchestrator's own API (OrchestratorURL, asked by the seed engine) is HTTPS."""
    return config.orchestrator_url.lower().startswith("https:")


def seed_tls_configured(config: Config) -> bool:
    """Whether seeds between agents run over mutual TLS (any seed TLS key is set)."""
    return bool(config.seed_tls_cert_file or config.seed_tls_key_file or config.seed_tls_ca_file)


def local_hostname(config: Config) -> str:
    """AgentHostname when set, else the kernel's host name (``uname -n``), as the Go
    agent's ``os.Hostname()``: never a reverse-DNS name, which on a host whose name maps
    to 127.0.1.1 is ``localhost`` and would make orchestrator call itself."""
    return config.agent_hostname or socket.gethostname()
