"""Who may take part in a seed: the stream handshake, keys, TLS and allowed networks.

Every stream opens with HELLO → CHALLENGE → AUTH → ACCEPT, whatever protects it:

* both sides send a fresh nonce; the stream key that tags every later frame is derived
  from both nonces, so frames cannot be replayed from or spliced into another stream;
* with a per-seed key (``?key=`` on both sides) each side proves it holds the key with
  an HMAC over the whole transcript, the sender before it sends any data and the
  receiver before the sender trusts its answers; the key itself never crosses the wire
  and only a derived per-seed secret is ever kept (see :func:`derive_auth_key`);
* under mutual TLS (SeedTLS*), the TLS layer has already checked the peer's certificate
  against SeedTLSCAFile (and the target's name through service_identity);
* with neither, only the peers :mod:`orchagent.seed.sources` allows, and the receiver
  warns that the stream is unauthenticated.

A mismatch (wrong key, one side keyed and the other not, wrong seed, a peer that may not
send) is a REJECT and the connection is closed: nothing reaches the disk before ACCEPT.
Every refusal looks the same to the peer: any HELLO is answered with a CHALLENGE, the
decision comes after AUTH, and the REJECT carries :data:`REFUSED` whatever the reason (the
receiver logs the reason).  A stranger probing seed ids learns nothing from the answer
(the receiver also sends every REJECT at the same delay, see
:data:`orchagent.seed.listener.REFUSAL_DELAY`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from typing import Any, Callable

import attrs
import blake3

from orchagent.errors import ConfigError
from orchagent.seed import frames
from orchagent.seed.frames import FrameType, ProtocolError

PROTOCOL = "orchagent-seed/1"
NONCE_SIZE = 16
#: The one answer to every refused stream.
REFUSED = "the receiver refused this stream (its log says why)"


class Rejected(Exception):
    """The peer (or our own check) refused the stream; the message says why."""


def derive_auth_key(key: str, seed_id: str) -> bytes:
    """The per-seed secret both sides really use: bound to the seed id, safe to persist."""
    material = key.encode("utf-8") + b"\x00" + seed_id.encode("utf-8")
    return blake3.blake3(material, derive_key_context="orchagent seed v1 auth key").digest()


def stream_key(auth_key: bytes | None, client_nonce: bytes, server_nonce: bytes) -> bytes:
    material = (auth_key or b"") + client_nonce + server_nonce
    return blake3.blake3(material, derive_key_context="orchagent seed v1 stream key").digest()


def _mac(auth_key: bytes, side: str, hello: dict, server_nonce: bytes) -> str:
    transcript = "|".join([side, PROTOCOL, hello["seed"], hello["session"], hello["role"],
                           str(hello["index"]), hello["nonce"], server_nonce.hex()])
    return hmac.new(auth_key, transcript.encode(), hashlib.sha256).hexdigest()


@attrs.frozen
class Admission:
    """What the receiver requires of streams for one seed."""

    auth_key: bytes | None
    #: Called with the peer's address when the stream has no key and no TLS; raises
    #: Rejected when the peer may not send, or returns a Deferred that fails so.
    check_peer: Callable[[str], Any] = lambda host: None


class ClientHandshake:
    """The sender's side of one stream's handshake (no I/O: frames in, frames out)."""

    def __init__(self, seed_id: str, session: str, role: str, index: int, auth_key: bytes | None):
        self.auth_key = auth_key
        self.nonce = os.urandom(NONCE_SIZE)
        self.hello_fields = {"proto": PROTOCOL, "seed": seed_id, "session": session,
                             "role": role, "index": index, "nonce": self.nonce.hex(),
                             "keyed": auth_key is not None,
                             # It can send early data (orchagent.seed.early).
                             "early": True}
        self.key: bytes | None = None
        self.accept: dict | None = None
        self._server_nonce: bytes | None = None

    def hello(self) -> bytes:
        return frames.seal_json(FrameType.HELLO, self.hello_fields)

    def receive(self, frame: frames.Frame) -> bytes | None:
        """Handle the receiver's frame; returns a frame to send, None once accepted."""
        if frame.type == FrameType.REJECT:
            raise Rejected(str(frames.open_json(frame).get("message", "rejected")))
        if self._server_nonce is None:
            if frame.type != FrameType.CHALLENGE:
                raise ProtocolError(f"expected CHALLENGE, got frame type {frame.type}")
            body = frames.open_json(frame)
            try:
                self._server_nonce = bytes.fromhex(body["nonce"])
            except (KeyError, TypeError, ValueError):
                raise ProtocolError("CHALLENGE without a nonce") from None
            if len(self._server_nonce) != NONCE_SIZE:
                raise ProtocolError("CHALLENGE nonce has the wrong size")
            mac = _mac(self.auth_key, "sender", self.hello_fields, self._server_nonce) if self.auth_key else ""
            return frames.seal_json(FrameType.AUTH, {"mac": mac})
        if frame.type != FrameType.ACCEPT:
            raise ProtocolError(f"expected ACCEPT, got frame type {frame.type}")
        candidate = stream_key(self.auth_key, self.nonce, self._server_nonce)
        body = frames.open_json(frame, candidate)
        if self.auth_key is not None:
            expected = _mac(self.auth_key, "receiver", self.hello_fields, self._server_nonce)
            if not hmac.compare_digest(str(body.get("mac", "")), expected):
                raise Rejected("the receiver did not prove it holds the seed key")
        self.key = candidate
        self.accept = body
        return None


class ServerHandshake:
    """The receiver's side: HELLO → CHALLENGE, AUTH → ACCEPT (or Rejected, decided only
    after AUTH: see the module docstring).  When the peer check answers later (a
    Deferred), :attr:`peer_check` holds it: the caller waits for it before accepting."""

    def __init__(self, admit: Callable[[str], Admission], peer_host: str):
        self._admit = admit
        self.peer_host = peer_host
        self.nonce = os.urandom(NONCE_SIZE)
        self.hello: dict | None = None
        self.admission: Admission | None = None
        self.key: bytes | None = None
        self.peer_check = None

    def receive(self, frame: frames.Frame) -> bytes | None:
        """Returns the CHALLENGE after HELLO; None after a good AUTH (then call accept())."""
        if self.hello is None:
            if frame.type != FrameType.HELLO:
                raise ProtocolError(f"expected HELLO, got frame type {frame.type}")
            hello = frames.open_json(frame)
            self._check_hello(hello)
            self.hello = hello
            return frames.seal_json(FrameType.CHALLENGE, {"nonce": self.nonce.hex()})
        if self.admission is not None or frame.type != FrameType.AUTH:
            raise ProtocolError(f"expected AUTH, got frame type {frame.type}")
        body = frames.open_json(frame)
        hello = self.hello
        admission = self._admit(hello["seed"])
        if admission.auth_key is not None and not hello["keyed"]:
            raise Rejected(f"seed {hello['seed']} needs a key and the sender has none")
        if admission.auth_key is None and hello["keyed"]:
            raise Rejected(f"the sender has a key for seed {hello['seed']} but this receiver "
                           "was given none")
        auth_key = admission.auth_key
        if auth_key is not None:
            expected = _mac(auth_key, "sender", hello, self.nonce)
            if not hmac.compare_digest(str(body.get("mac", "")), expected):
                raise Rejected(f"wrong key for seed {hello['seed']}")
        else:
            self.peer_check = admission.check_peer(self.peer_host)
        self.admission = admission
        self.key = stream_key(auth_key, bytes.fromhex(hello["nonce"]), self.nonce)
        return None

    def accept(self, **fields) -> bytes:
        """The ACCEPT frame (tagged with the new stream key), with extra fields."""
        body = dict(fields)
        if self.admission.auth_key is not None:
            body["mac"] = _mac(self.admission.auth_key, "receiver", self.hello, self.nonce)
        return frames.seal_json(FrameType.ACCEPT, body, self.key)

    @staticmethod
    def _check_hello(hello: dict) -> None:
        if hello.get("proto") != PROTOCOL:
            raise Rejected(f"unsupported seed protocol {str(hello.get('proto'))[:40]!r}")
        ok = (isinstance(hello.get("seed"), str) and isinstance(hello.get("session"), str)
              and hello.get("role") in ("control", "data", "stream")
              and isinstance(hello.get("index"), int)
              and isinstance(hello.get("nonce"), str) and isinstance(hello.get("keyed"), bool))
        if not ok:
            raise ProtocolError("malformed HELLO")
        try:
            if len(bytes.fromhex(hello["nonce"])) != NONCE_SIZE:
                raise ValueError
        except ValueError:
            raise ProtocolError("HELLO nonce is malformed") from None


def reject_frame(message: str) -> bytes:
    return frames.seal_json(FrameType.REJECT, {"message": message})


def parse_networks(values: list[str]) -> tuple:
    """SeedAllowedNetworks as ip_network objects; a bad entry is a ConfigError naming it."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ConfigError(f"key SeedAllowedNetworks: {value!r} is not a network (CIDR)") from None
    return tuple(networks)


def peer_allowed(host: str, networks: tuple) -> bool:
    """Empty list = any peer (the original's behaviour, warned about by the caller)."""
    if not networks:
        return True
    address = address_of(host)
    return address is not None and any(address in network for network in networks)


def is_loopback(host: str) -> bool:
    address = address_of(host)
    return address is not None and address.is_loopback


def address_of(host: str):
    """The IP address ``host`` is (an IPv4-mapped IPv6 address as its IPv4 one), or None
    for a name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as e:
        raise ConfigError(f"key {key}: cannot read {path}: {e.strerror}") from None


def _tls_material(config):
    from twisted.internet import ssl

    if not (config.seed_tls_cert_file and config.seed_tls_key_file and config.seed_tls_ca_file):
        raise ConfigError("seed TLS needs all of SeedTLSCertFile, SeedTLSKeyFile and SeedTLSCAFile")
    pem = _read(config.seed_tls_cert_file, "SeedTLSCertFile") + b"\n" + _read(
        config.seed_tls_key_file, "SeedTLSKeyFile")
    try:
        own = ssl.PrivateCertificate.loadPEM(pem)
        ca = ssl.Certificate.loadPEM(_read(config.seed_tls_ca_file, "SeedTLSCAFile"))
    except Exception as e:
        raise ConfigError(f"seed TLS certificate, key or CA is not valid PEM: {e}") from None
    return own, ca


def tls_server_options(config):
    """Server side: present our certificate, require one signed by SeedTLSCAFile."""
    own, ca = _tls_material(config)
    return own.options(ca)


def tls_client_options(config, hostname: str):
    """Client side: check the receiver's certificate and name, present ours."""
    from twisted.internet import ssl

    own, ca = _tls_material(config)
    return ssl.optionsForClientTLS(hostname, trustRoot=ca, clientCertificate=own)
