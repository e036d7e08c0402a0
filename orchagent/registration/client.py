"""PLACEHOLDER: replaced by the registration work."""
from twisted.application import service

class Registration(service.Service):
    def __init__(self, config, reactor, hostname, token, http_client=None):
        self.config = config
    def is_healthy(self):
        return True
