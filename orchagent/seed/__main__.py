"""Entry point of the seed engine process, which the agent starts (see
:mod:`orchagent.seed.engine_process`)::

    python -P -m orchagent.seed --parent-pid PID [--without-tls]

The command line is read before Twisted is imported, because of ``--without-tls``: the
agent passes it when no seed TLS is configured, and the engine then never loads
pyOpenSSL.  Twisted's TCP transport imports it only to offer startTLS, and with it come
libssl, libcrypto and cryptography's bindings: 13 MB of resident memory, a quarter of an
idle engine, in a process that would never use them.  Twisted supports running without
pyOpenSSL (its transports then have no TLS), so the module is marked absent
(``sys.modules[name] = None`` makes every import of it fail) and Twisted takes that path.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m orchagent.seed",
                                     description="The agent's seed engine; started by the agent.")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--without-tls", action="store_true",
                        help="no seed TLS is configured: do not load pyOpenSSL")
    return parser.parse_args(argv)


def without_tls() -> None:
    """Make ``import OpenSSL`` fail in this process (see the module docstring)."""
    sys.modules["OpenSSL"] = None  # type: ignore[assignment]


if __name__ == "__main__":
    args = parse_args()
    if args.without_tls:
        without_tls()
    from orchagent.seed import engine_process

    engine_process.main(args.parent_pid)
