"""The twistd plugin's way in: ``twistd -n orchestrator-agent [--config FILE] [--port N]``
parses :class:`Options` here and calls :func:`makeService`.

This module is kept light on purpose: it reads the configuration before anything that
imports Twisted's transports, its endpoints or Klein (:mod:`orchagent.service` does all
three), so that a daemon without any TLS to do can run without pyOpenSSL
(:mod:`orchagent.pyopenssl`).  Tests build the service tree in their own process through
:func:`orchagent.service.makeService`, which never makes that choice for the process.
"""

from __future__ import annotations

from orchagent import pyopenssl
from orchagent.options import Options, load_config

__all__ = ["Options", "makeService"]


def makeService(options):
    config = load_config(options)
    if not pyopenssl.needed_by_daemon(config):
        pyopenssl.keep_out()
    from orchagent import service

    return service.build_service(config, options)
