"""PLACEHOLDER: replaced by the seed engine work."""
from twisted.application import service
from orchagent.errors import NotAvailable

class SeedManager(service.Service):
    def __init__(self, config, reactor, runner, host, service_, snapshots):
        self.config = config
    def __getattr__(self, name):
        if name.startswith("_") or name in ("parent", "name", "running"):
            raise AttributeError(name)
        async def unavailable(*a, **k):
            raise NotAvailable(f"seeding is not available yet ({name})")
        return unavailable
