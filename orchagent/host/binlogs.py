"""PLACEHOLDER: replaced by the host-facts work."""
from orchagent.errors import NotAvailable

class MySQLLogs:
    def __init__(self, config, runner, reactor, host):
        self.config = config
    def __getattr__(self, name):
        async def unavailable(*a, **k):
            raise NotAvailable(f"{name} is not available yet")
        return unavailable
