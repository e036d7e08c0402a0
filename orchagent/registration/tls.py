"""HTTPS towards orchestrator: who we trust and what we present.

orchestrator's certificate is checked against ``SSLCAFile`` (or the platform's trust store
when that is empty) and its host name (or IP address) through service_identity, for the
host of each URL.  ``SSLSkipVerify`` turns both checks off; the registration service warns
about it at start.  With ``UseMutualTLS`` we present ``SSLCertFile``/``SSLPrivateKeyFile``.
Files are read once, when the client is built, so a bad file stops the daemon at start.
"""

from __future__ import annotations

from twisted.internet import ssl
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from orchagent.api.tls import load_certificates, load_key_pair
from orchagent.config import Config


@implementer(IPolicyForHTTPS)
class OrchestratorTLSPolicy:
    """Connection creators for orchestrator's HTTPS URLs, per host name."""

    def __init__(self, trust_root, client_certificate: ssl.PrivateCertificate | None,
                 extra_chain: list[ssl.Certificate], verify: bool):
        self._trust_root = trust_root
        self._client_certificate = client_certificate
        self._extra = {"extraCertChain": [c.original for c in extra_chain]} if extra_chain else {}
        self._verify = verify

    @classmethod
    def from_config(cls, config: Config) -> "OrchestratorTLSPolicy":
        trust_root = None
        if config.ssl_ca_file and not config.ssl_skip_verify:
            trust_root = ssl.trustRootFromCertificates(
                load_certificates(config.ssl_ca_file, "SSLCAFile"))
        client_certificate, extra_chain = None, []
        if config.use_mutual_tls:
            client_certificate, extra_chain = load_key_pair(config)
        return cls(trust_root, client_certificate, extra_chain, not config.ssl_skip_verify)

    def creatorForNetloc(self, hostname: bytes, port: int):
        if not self._verify:
            key = {}
            if self._client_certificate is not None:
                key = {"privateKey": self._client_certificate.privateKey.original,
                       "certificate": self._client_certificate.original, **self._extra}
            return ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2, **key)
        return ssl.optionsForClientTLS(
            hostname.decode("ascii"),
            trustRoot=self._trust_root,
            clientCertificate=self._client_certificate,
            extraCertificateOptions=dict(self._extra) or None,
        )
