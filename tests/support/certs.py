"""A throwaway certificate authority for TLS tests, and HTTPS clients that use it.

Example::

    from tests.support.certs import TestCA, https_client

    ca = TestCA(self.mktemp())                       # writes ca.pem (+ its key) there
    server = ca.issue("agent", dns=["localhost"], ips=["127.0.0.1"])
    client = ca.issue("orchestrator", ou="dba", client=True)
    config = {"UseSSL": True, "SSLCertFile": server.cert_path,
              "SSLPrivateKeyFile": server.key_path, "SSLCAFile": ca.cert_path}
    treq_client = https_client(ca, client)     # verifies the server, presents `client`

Keys are ECDSA P-256: generating one takes about a millisecond, so every test can have
its own authority.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Iterable

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@attrs.frozen
class Issued:
    """A certificate and its key, in memory and as PEM files."""

    name: str
    cert_path: str
    key_path: str
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _write(path: str, data: bytes) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class TestCA:
    """A self-signed CA in ``directory`` (created if missing) that issues leaf certificates."""

    def __init__(self, directory: str, name: str = "orchagent test CA"):
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = _write(os.path.join(directory, "ca.pem"),
                                self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, *, dns: Iterable[str] = (), ips: Iterable[str] = (),
              ou: str | None = None, client: bool | None = False) -> Issued:
        """A leaf certificate ``name`` (CN) for the given DNS names/IPs, optionally with an OU.

        ``client=True`` makes a client-authentication certificate, ``False`` a server one,
        ``None`` one without extended key usage (both, as seed peers need).
        Files are ``{name}.pem`` and ``{name}.key`` in the CA's directory.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
        if ou is not None:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
        )
        if client is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False)
        names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        cert_path = _write(os.path.join(self.directory, f"{name}.pem"),
                           certificate.public_bytes(serialization.Encoding.PEM))
        key_path = _write(os.path.join(self.directory, f"{name}.key"), _key_pem(key))
        return Issued(name, cert_path, key_path, certificate, key)


def seed_tls(ca: TestCA, name: str) -> dict:
    """Config values for a seed peer ``name`` on loopback: its certificate (server and
    client at once), key and the authority."""
    peer = ca.issue(name, dns=["localhost"], ips=["127.0.0.1"], client=None)
    return {"seed_tls_cert_file": peer.cert_path, "seed_tls_key_file": peer.key_path,
            "seed_tls_ca_file": ca.cert_path}


def https_client(ca: TestCA | None, client: Issued | None = None, *, verify: bool = True):
    """A treq HTTPClient trusting ``ca`` (host names checked), presenting ``client`` if given.

    Connections are not pooled, so nothing is left open when the test ends.
    """
    from twisted.internet import reactor, ssl
    from twisted.web.client import Agent, HTTPConnectionPool
    from treq.client import HTTPClient

    from orchagent.registration.tls import OrchestratorTLSPolicy

    trust_root = ssl.trustRootFromCertificates(
        [ssl.Certificate.loadPEM(ca.certificate.public_bytes(serialization.Encoding.PEM))]
    ) if ca is not None else None
    client_certificate = None
    if client is not None:
        pem = client.certificate.public_bytes(serialization.Encoding.PEM) + _key_pem(client.key)
        client_certificate = ssl.PrivateCertificate.loadPEM(pem)
    policy = OrchestratorTLSPolicy(trust_root, client_certificate, [], verify=verify)
    return HTTPClient(Agent(reactor, contextFactory=policy,
                            pool=HTTPConnectionPool(reactor, persistent=False)))
