"""The seed wing's seams (#18): the seed surface is written once, as an interface that
the manager and the engine proxy both provide and the channel's calls are read from;
every job provides the job interface; jobs see a SeedContext, never the manager, and
only the manager makes and registers jobs (hot seeds included)."""

from __future__ import annotations

import ast
import os

from twisted.internet import reactor
from twisted.trial import unittest
from zope.interface.verify import verifyClass, verifyObject

import orchagent
from orchagent.backups.hot import HotSeedJob
from orchagent.config import Config
from orchagent.interfaces import IReceivePayload, ISeedJob, ISeedStream, ISeedSurface
from orchagent.seed import channel, remote
from orchagent.seed.command import CommandJob
from orchagent.seed.receiver import ReceiveJob
from orchagent.seed.sender import SendJob
from orchagent.seed.listener import ReceiverStream
from orchagent.seed.sender import SenderStream
from orchagent.seed.stream_receive import StreamReceive
from orchagent.seed.streamed import StreamSendJob
from orchagent.seed.tree_receive import TreeReceive
from tests import seed_support as S

JOB_MODULES = ("seed/command.py", "seed/receiver.py", "seed/sender.py", "seed/streamed.py",
               "seed/tree_receive.py", "seed/stream_receive.py",
               "backups/hot.py", "replica/seeded.py")


class SeedSurfaceTests(unittest.TestCase):
    def test_the_manager_and_the_engine_proxy_provide_it(self):
        base = os.path.abspath(self.mktemp())
        manager = S.make_manager(self, base, base, S.free_port(), start=False)
        self.assertTrue(verifyObject(ISeedSurface, manager))
        config = Config(state_dir=os.path.join(base, "state"))
        self.assertTrue(verifyObject(ISeedSurface, remote.SeedEngineProcess(config, reactor)))

    def test_the_channel_calls_are_the_surface(self):
        self.assertEqual(channel.CALLS, frozenset(ISeedSurface.names()))
        self.assertIn("datadir_usage", channel.CALLS)

    def test_every_job_provides_the_job_interface(self):
        for job in (ReceiveJob, SendJob, StreamSendJob, CommandJob, HotSeedJob):
            self.assertTrue(verifyClass(ISeedJob, job), job)

    def test_both_payloads_of_a_receive_provide_the_payload_interface(self):
        for payload in (TreeReceive, StreamReceive):
            self.assertTrue(verifyClass(IReceivePayload, payload), payload)

    def test_both_ends_of_a_connection_provide_the_stream_interface(self):
        for stream in (ReceiverStream, SenderStream):
            self.assertTrue(verifyClass(ISeedStream, stream), stream)


class JobsSeeAContextTests(unittest.TestCase):
    def test_no_job_module_imports_or_reaches_into_the_manager(self):
        root = os.path.dirname(os.path.abspath(orchagent.__file__))
        for name in JOB_MODULES:
            with open(os.path.join(root, name), encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    self.assertNotEqual(node.module, "orchagent.seed.manager", name)
                if isinstance(node, ast.Attribute) and node.attr == "manager":
                    base = node.value
                    self.assertFalse(isinstance(base, ast.Name) and base.id in ("self", "job"),
                                     f"{name}:{node.lineno} reaches for the manager")
                # Only the manager registers jobs: no ``<anything>.jobs[...] = ...`` here.
                if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
                    target = node.value
                    self.assertFalse(isinstance(target, ast.Attribute) and target.attr == "jobs",
                                     f"{name}:{node.lineno} registers a job")
