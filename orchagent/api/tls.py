"""TLS for the agent's own API: the server context, the client-certificate OU check, PEM files.

Mutual TLS keeps the original agent's shape.  The handshake verifies a client certificate
*if one is given* (it must chain to ``SSLCAFile``, else the handshake fails); each request
is then checked by the guard from :func:`make_ou_guard`: every guarded endpoint needs a
verified client certificate, and its OU must be one of ``SSLValidOUs`` when that list is
non-empty.  The status endpoint is guarded only with ``StatusOUVerify``, so a health
checker without a certificate can still ask for it, as with the original.

The PEM loaders are shared with the registration client (orchestrator's trust root and
our client certificate); they raise :class:`~orchagent.errors.ConfigError` naming the key
and the file, so a bad file stops the daemon at start rather than at the first request.
"""

from __future__ import annotations

from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet import interfaces, ssl
from twisted.logger import Logger

from orchagent.config import Config
from orchagent.errors import ConfigError

log = Logger()


def _read(path: str, key: str) -> bytes:
    if not path:
        raise ConfigError(f"key {key} is empty but a file is needed")
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as e:
        raise ConfigError(f"{path} (key {key}): cannot read: {e.strerror}") from e


def load_certificates(path: str, key: str) -> list[ssl.Certificate]:
    """Every certificate of a PEM file (a certificate, its chain, or a CA bundle)."""
    data = _read(path, key)
    try:
        parsed = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise ConfigError(f"{path} (key {key}): no PEM certificate could be read: {e}") from e
    return [ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)) for c in parsed]


def load_private_key(path: str, key: str) -> ssl.KeyPair:
    """The (unencrypted) PEM private key of ``path``."""
    data = _read(path, key)
    try:
        parsed = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path} (key {key}): not an unencrypted PEM private key: {e}") from e
    return ssl.KeyPair(crypto.PKey.from_cryptography_key(parsed))


def load_key_pair(config: Config) -> tuple[ssl.PrivateCertificate, list[ssl.Certificate]]:
    """SSLCertFile + SSLPrivateKeyFile: our certificate with its key, and the rest of its chain.

    A key that does not belong to the certificate is a ConfigError naming both files.
    """
    chain = load_certificates(config.ssl_cert_file, "SSLCertFile")
    key = load_private_key(config.ssl_private_key_file, "SSLPrivateKeyFile")
    if not key.matches(chain[0].getPublicKey()):
        raise ConfigError(
            f"{config.ssl_private_key_file} (key SSLPrivateKeyFile) does not match the "
            f"certificate in {config.ssl_cert_file} (key SSLCertFile)")
    return ssl.PrivateCertificate.fromCertificateAndKeyPair(chain[0], key), chain[1:]


def server_tls_options(config: Config) -> ssl.CertificateOptions:
    """TLS options of the API's SSL4ServerEndpoint (UseSSL; UseMutualTLS adds client verification)."""
    ours, extra_chain = load_key_pair(config)
    options: dict[str, Any] = {}
    if config.use_mutual_tls:
        authorities = load_certificates(config.ssl_ca_file, "SSLCAFile")
        # Verify a certificate when given, fail the handshake when it does not chain to
        # SSLCAFile; requiring one is the request guard's job (see the module docstring).
        options.update(verify=True, requireCertificate=False,
                       caCerts=[c.original for c in authorities])
    return ssl.CertificateOptions(
        privateKey=ours.privateKey.original,
        certificate=ours.original,
        extraCertChain=[c.original for c in extra_chain],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        **options,
    )


def peer_certificate(request) -> x509.Certificate | None:
    """The verified client certificate of the request's TLS connection, if any."""
    transport = interfaces.ISSLTransport(getattr(request, "transport", None), None)
    if transport is None:
        return None
    certificate = transport.getPeerCertificate()
    return certificate.to_cryptography() if certificate is not None else None


def certificate_ous(certificate: x509.Certificate) -> list[str]:
    return [str(a.value) for a in certificate.subject.get_attributes_for_oid(
        NameOID.ORGANIZATIONAL_UNIT_NAME)]


def make_ou_guard(config: Config) -> Callable[[Any], None]:
    """The per-request client-certificate check of UseMutualTLS.

    The returned callable raises :class:`~orchagent.api.resource.AccessDenied` when the
    request came without a verified client certificate, or with one whose OUs are all
    outside a non-empty ``SSLValidOUs``.
    """
    from orchagent.api.resource import AccessDenied

    if not config.use_ssl:
        log.warn("UseMutualTLS is set but UseSSL is not: every guarded endpoint will refuse "
                 "requests, since plain HTTP carries no client certificate")
    valid = frozenset(config.ssl_valid_ous)

    def guard(request) -> None:
        certificate = peer_certificate(request)
        if certificate is None:
            raise AccessDenied("client certificate required (UseMutualTLS)")
        if valid:
            presented = certificate_ous(certificate)
            if not valid.intersection(presented):
                raise AccessDenied(f"Invalid OU: client certificate OU {presented} not in SSLValidOUs")

    return guard
