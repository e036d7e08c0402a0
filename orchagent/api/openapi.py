"""The OpenAPI 3 description of the HTTP API, kept beside this module in ``openapi.json``.

The stored document describes the default configuration and is what the repository
reviews and tests (``tests/test_openapi.py`` fails when a route and the document
disagree).  :func:`document` adjusts it to one agent's configuration, so that what
``/api/openapi.json`` serves is exact for that agent: the status route's path
(StatusEndpoint), the token header's name (TokenHttpHeader; no header scheme when unset),
basic auth required on every operation when HTTPAuthUser is set, and ``/metrics``
token-free when MetricsOpen is set.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
from typing import Any

#: The status route's path in the stored document (StatusEndpoint's default).
STORED_STATUS_PATH = "/api/status"


@functools.cache
def stored_document() -> dict[str, Any]:
    """The document as kept in the repository (parsed once; callers must not modify it)."""
    text = importlib.resources.files(__package__).joinpath("openapi.json").read_text("utf-8")
    return json.loads(text)


def document(config) -> dict[str, Any]:
    """The document for an agent running with ``config``."""
    doc = copy.deepcopy(stored_document())
    paths = doc["paths"]
    if config.status_endpoint != STORED_STATUS_PATH:
        paths[config.status_endpoint] = paths.pop(STORED_STATUS_PATH)
    if config.metrics_open:
        paths["/metrics"]["get"]["security"] = [{}]
    schemes = doc["components"]["securitySchemes"]
    if config.token_http_header:
        schemes["tokenHeader"]["name"] = config.token_http_header
    else:
        del schemes["tokenHeader"]
    for requirements in _security_lists(doc):
        if not config.token_http_header:
            requirements[:] = [r for r in requirements if "tokenHeader" not in r]
        if config.http_auth_user:
            for requirement in requirements:
                requirement["basicAuth"] = []
    return doc


def _security_lists(doc: dict[str, Any]):
    yield doc["security"]
    for operations in doc["paths"].values():
        for operation in operations.values():
            if "security" in operation:
                yield operation["security"]
