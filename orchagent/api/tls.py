"""PLACEHOLDER: replaced by the registration/TLS work."""
def make_ou_guard(config):
    return lambda request: None
def server_tls_options(config):
    raise NotImplementedError
