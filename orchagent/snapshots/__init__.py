"""PLACEHOLDER: replaced by the snapshots work."""
from orchagent.host.facts import MySQLHost as _Unavailable

def build_backend(config, runner, reactor, host, service):
    return _Unavailable(config, runner, reactor, service)
