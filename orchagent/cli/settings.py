"""The controller's own settings: where agents are and how to prove we may call them.

An agent accepts a call when it carries the agent's token (``?token=``).  Agents started
with ``TokenFile`` read their token from that file instead of inventing one, so an operator
gives every agent (or every group of agents) a token file and the controller a copy.  The
controller finds the token for a host, first match wins:

1. ``--token-file FILE`` on the command line (every host);
2. the ``ORCHAGENT_TOKEN_FILE`` environment variable (every host);
3. ``TokenFile`` of the host's entry in the controller config;
4. ``TokenFile`` at the top of the controller config.

The controller config is ``~/.orchagent/config.json`` (``ORCHAGENT_HOME`` moves the
directory, ``--config`` or ``ORCHAGENT_CONFIG`` names another file).  It is optional; keys
reuse the agent config's names where they mean the same thing::

    {
      "Port": 3002,
      "TokenFile": "/etc/orchagent/token",
      "UseSSL": true,
      "SSLCAFile": "/etc/orchagent/ca.pem",
      "SSLCertFile": "/etc/orchagent/operator.pem",
      "SSLPrivateKeyFile": "/etc/orchagent/operator.key",
      "HTTPAuthUser": "orc", "HTTPAuthPasswordFile": "/etc/orchagent/http-password",
      "Hosts": {"db2": {"URL": "https://db2.example:3002", "TokenFile": "/etc/orchagent/db2.token"}}
    }

A HOST on the command line is a name from ``Hosts``, or ``name``, ``name:port``,
``[v6addr]:port``, ``http://name:port`` or ``https://name:port``; the port defaults to
``Port`` (3002) and the scheme to https when ``UseSSL`` is true.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping
from urllib.parse import urlsplit

import attrs

DEFAULT_PORT = 3002

#: Keys allowed at the top of the controller config and in a ``Hosts`` entry.
_COMMON_KEYS = {"TokenFile": str, "UseSSL": bool, "SSLCAFile": str, "SSLCertFile": str,
                "SSLPrivateKeyFile": str, "HTTPAuthUser": str, "HTTPAuthPasswordFile": str}
_TOP_KEYS = dict(_COMMON_KEYS, Port=int, Hosts=dict)
_HOST_KEYS = dict(_COMMON_KEYS, URL=str)


class SettingsError(Exception):
    """The controller config, a host name or a token file is unusable."""


@attrs.frozen
class AgentAddress:
    """Everything needed to call one agent.  The token never shows in a repr."""

    #: The HOST as the operator wrote it (for messages and the seed state file).
    name: str
    #: Base URL without a trailing slash, e.g. ``http://db2.example:3002``.
    url: str
    token: str = attrs.field(repr=False)
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    auth: tuple[str, str] | None = attrs.field(default=None, repr=False)

    @property
    def host(self) -> str:
        """The host part of the URL: what another agent connects to (seed stream)."""
        return urlsplit(self.url).hostname or ""

    @property
    def is_https(self) -> bool:
        return self.url.startswith("https://")


@attrs.frozen
class Settings:
    home: str
    entries: Mapping[str, Any]
    token_file_override: str = ""

    @property
    def seeds_dir(self) -> str:
        return os.path.join(self.home, "seeds")

    def _value(self, host_entry: Mapping[str, Any], key: str, default: Any = "") -> Any:
        if key in host_entry:
            return host_entry[key]
        return self.entries.get(key, default)

    def resolve(self, host: str) -> AgentAddress:
        """The address of ``host``; SettingsError naming what is missing or wrong."""
        hosts = self.entries.get("Hosts", {})
        entry = hosts.get(host, {})
        use_ssl = bool(self._value(entry, "UseSSL", False))
        port = int(self.entries.get("Port", DEFAULT_PORT))
        url = entry.get("URL") or _url_of(host, port, use_ssl)
        token = self._token(host, entry)
        auth = None
        user = self._value(entry, "HTTPAuthUser")
        if user:
            password_file = self._value(entry, "HTTPAuthPasswordFile")
            if not password_file:
                raise SettingsError(f"host {host}: HTTPAuthUser is set but HTTPAuthPasswordFile is not")
            auth = (user, _read_secret(password_file, "HTTPAuthPasswordFile"))
        return AgentAddress(
            name=host, url=url.rstrip("/"), token=token,
            ca_file=self._value(entry, "SSLCAFile"), cert_file=self._value(entry, "SSLCertFile"),
            key_file=self._value(entry, "SSLPrivateKeyFile"), auth=auth)

    def _token(self, host: str, entry: Mapping[str, Any]) -> str:
        path = self.token_file_override or entry.get("TokenFile") or self.entries.get("TokenFile")
        if not path:
            raise SettingsError(
                f"no token for host {host}: give --token-file FILE, set ORCHAGENT_TOKEN_FILE, "
                "or set TokenFile in the controller config (the same file the agents read "
                "with their TokenFile key)")
        return _read_secret(path, "token file")


def _read_secret(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            value = fh.read().strip()
    except OSError as e:
        raise SettingsError(f"{what} {path}: cannot read: {e.strerror}") from None
    if not value or any(c.isspace() for c in value):
        raise SettingsError(f"{what} {path}: must hold one word (no white space)")
    return value


def _url_of(host: str, port: int, use_ssl: bool) -> str:
    if "://" in host:
        parts = urlsplit(host)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingsError(f"invalid host {host!r}: expected http://name:port or https://name:port")
        if parts.path not in ("", "/") or parts.query:
            raise SettingsError(f"invalid host {host!r}: a host URL has no path or query")
        netloc = parts.netloc if parts.port else f"{parts.netloc}:{port}"
        return f"{parts.scheme}://{netloc}"
    parts = urlsplit("//" + host)
    try:
        given_port = parts.port
    except ValueError:
        raise SettingsError(f"invalid host {host!r}: bad port") from None
    if not parts.hostname or parts.path or parts.query or "@" in host:
        raise SettingsError(f"invalid host {host!r}: expected name, name:port or [address]:port")
    name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{'https' if use_ssl else 'http'}://{name}:{given_port or port}"


def _check_keys(doc: Mapping[str, Any], allowed: Mapping[str, type], where: str) -> None:
    for key, value in doc.items():
        kind = allowed.get(key)
        if kind is None:
            raise SettingsError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(allowed))})")
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise SettingsError(f"{where}: key {key} must be an integer, not {value!r}")
        if kind is not int and not isinstance(value, kind):
            raise SettingsError(f"{where}: key {key} must be a {kind.__name__}, not {value!r}")


def load_settings(environ: Mapping[str, str], config_path: str | None = None,
                  token_file: str | None = None) -> Settings:
    """Read the controller config (optional unless named explicitly) and the token override."""
    home = environ.get("ORCHAGENT_HOME") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".orchagent")
    explicit = config_path or environ.get("ORCHAGENT_CONFIG")
    path = explicit or os.path.join(home, "config.json")
    entries: dict[str, Any] = {}
    if explicit or os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as fh:
                entries = json.load(fh)
        except OSError as e:
            raise SettingsError(f"{path}: cannot read the controller config: {e.strerror}") from None
        except ValueError as e:
            raise SettingsError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(entries, dict):
            raise SettingsError(f"{path}: the controller config must be a JSON object")
        _check_keys(entries, _TOP_KEYS, path)
        for name, entry in entries.get("Hosts", {}).items():
            if not isinstance(entry, dict):
                raise SettingsError(f"{path}: Hosts.{name} must be an object")
            _check_keys(entry, _HOST_KEYS, f"{path}: Hosts.{name}")
    override = token_file or environ.get("ORCHAGENT_TOKEN_FILE") or ""
    return Settings(home=home, entries=entries, token_file_override=override)
