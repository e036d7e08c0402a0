"""Whether a process of the agent needs pyOpenSSL, and how it goes without it.

Twisted imports pyOpenSSL as soon as its TCP transport, its endpoints or Klein are
imported, only to offer TLS; with it come cryptography's bindings, libssl and libcrypto:
12-13 MB of resident memory, a fifth of the daemon and a quarter of an idle seed engine.
Most agents never use it: the API is plain HTTP, orchestrator is reached over plain HTTP
and seeds are authenticated by HMAC or network.  Twisted supports running without
pyOpenSSL (its transports then have no TLS), so a process that needs no TLS marks the
module absent before Twisted is imported (``sys.modules[name] = None`` makes every
import of it fail) and Twisted takes that path.

The decision is made once, at start, from the configuration: the daemon in
:mod:`orchagent.tap`, the seed engine from its command line (:mod:`orchagent.seed.__main__`).
"""

from __future__ import annotations

import sys

from orchagent.config import Config, agents_server_over_https, orchestrator_over_https, seed_tls_configured


def needed_by_daemon(config: Config) -> bool:
    """Whether the daemon may use TLS: an HTTPS API (or mutual TLS on it), orchestrator
    reached over HTTPS, or seed TLS (its files are checked at start, and in process the
    seeds use it)."""
    return bool(config.use_ssl or config.use_mutual_tls
                or agents_server_over_https(config) or orchestrator_over_https(config)
                or seed_tls_configured(config))


def keep_out() -> None:
    """Make ``import OpenSSL`` fail in this process (see the module docstring); called
    before Twisted is imported."""
    sys.modules["OpenSSL"] = None  # type: ignore[assignment]
