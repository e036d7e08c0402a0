"""orchagent: a drop-in replacement for orchestrator-agent that seeds MySQL replicas safely."""

__version__ = "0.1.0"
