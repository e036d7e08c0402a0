"""Entry point of the seed engine process, which the agent starts (see
:mod:`orchagent.seed.engine_process`)::

    python -P -m orchagent.seed --parent-pid PID [--without-tls]

The command line is read before Twisted is imported, because of ``--without-tls``: the
agent passes it when no seed TLS is configured, and the engine then never loads
pyOpenSSL (:mod:`orchagent.pyopenssl`).
"""

from __future__ import annotations

import argparse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m orchagent.seed",
                                     description="The agent's seed engine; started by the agent.")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--without-tls", action="store_true",
                        help="no seed TLS is configured: do not load pyOpenSSL")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    if args.without_tls:
        from orchagent import pyopenssl

        pyopenssl.keep_out()
    from orchagent.seed import engine_process

    engine_process.main(args.parent_pid)
