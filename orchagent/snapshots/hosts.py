"""PLACEHOLDER: replaced by the host-facts work."""
from orchagent.errors import NotAvailable

class SnapshotHosts:
    def __init__(self, config, runner):
        self.config = config
    def __getattr__(self, name):
        async def unavailable(*a, **k):
            raise NotAvailable(f"{name} is not available yet")
        return unavailable
