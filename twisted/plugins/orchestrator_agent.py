"""twistd plugin: ``twistd -n orchestrator-agent``."""

from twisted.application.service import ServiceMaker

orchestrator_agent = ServiceMaker(
    "orchestrator-agent",
    "orchagent.tap",
    "orchestrator-agent: MySQL host agent for orchestrator (snapshots, verified seeds)",
    "orchestrator-agent",
)
