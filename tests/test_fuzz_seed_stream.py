"""Stateful fuzzing of the seed receiver's decoder and handshake (hypothesis).

A RuleBasedStateMachine plays a sender that mixes valid protocol steps (HELLO, AUTH with
the right or a wrong MAC, manifests) with garbage, bit flips, oversized lengths and
arbitrary cuts of the byte stream.  Whatever it does, the receiver side (FrameSplitter +
ServerHandshake, as ReceiverStream drives them) only ever raises the protocol's own
errors, never accepts a sender that did not prove the key, and buffers no more than one
frame's worth.  The frame codec's properties are in tests/test_seed_frames.py.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition, rule,
                                 run_state_machine_as_test)
from twisted.trial import unittest

from orchagent.errors import BadRequest
from orchagent.seed import auth, frames, tree
from orchagent.seed.auth import Admission, Rejected
from orchagent.seed.frames import FrameType, ProtocolError

SEED = "77"
KEY = auth.derive_auth_key("right", SEED)
WRONG = auth.derive_auth_key("wrong", SEED)


def _admission(seed: str) -> Admission:
    """As SeedManager.admission: only the seed being received, and it needs the key."""
    if seed != SEED:
        raise Rejected(f"this host is not receiving seed {seed}")
    return Admission(KEY)


class ReceiverDecoder(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.splitter = frames.FrameSplitter(max_body=1 << 20)
        self.server = auth.ServerHandshake(_admission, "10.0.0.1")
        self.client: auth.ClientHandshake | None = None
        self.broken = False
        self.accepted = False
        self.proved = False
        self.pending = b""

    def feed(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            for frame in self.splitter.feed(data):
                if self.accepted:
                    # After the handshake the job checks every frame against the stream key.
                    if frame.type == FrameType.DATA:
                        frames.unpack_chunk(frames.open_data(frame, self.server.key))
                    elif frame.type == FrameType.MANIFEST:
                        entries = [tree.Entry.from_wire(e) for e in frames.open_packed(frame, self.server.key)]
                        tree.validate(tree.Manifest(tuple(entries), 1 << 20))
                    else:
                        frames.open_control(frame, self.server.key)
                    continue
                reply = self.server.receive(frame)
                if reply is None:
                    self.accepted = True
                    self.server.accept()
                elif self.client is not None and self.client.key is None:
                    auth_frame = self.client.receive(next(frames.iter_frames([reply])))
                    self.pending = auth_frame or b""
        except (ProtocolError, Rejected, BadRequest):
            self.broken = True

    @rule(keyed=st.sampled_from(["right", "wrong", None]), seed=st.sampled_from([SEED, "other"]))
    def hello(self, keyed, seed):
        key = {"right": KEY, "wrong": WRONG, None: None}[keyed]
        client = auth.ClientHandshake(seed, "s", "control", 0, key)
        if self.server.hello is None and not self.broken:
            # Only the first HELLO can start the handshake; a later one breaks the stream.
            self.client = client
            self.proved = keyed == "right" and seed == SEED
        self.feed(client.hello())

    @precondition(lambda self: self.pending)
    @rule(cut=st.integers(0, 200))
    def send_auth(self, cut):
        data, self.pending = self.pending, b""
        self.feed(data[:cut])
        self.feed(data[cut:])

    @rule(data=st.binary(max_size=300))
    def garbage(self, data):
        self.feed(data)

    @rule(ftype=st.integers(0, 255), length=st.integers(0, 2**32 - 1))
    def header(self, ftype, length):
        self.feed(struct.pack(">BBI", ftype, 0, length))

    @precondition(lambda self: self.accepted and not self.broken)
    @rule(path=st.sampled_from(["/etc/passwd", "../x", "a/../../b", "ok", "d/f", ""]),
          kind=st.sampled_from(["f", "d", "l", "x"]), link=st.sampled_from(["", "/", "../..", "d"]))
    def manifest(self, path, kind, link):
        self.feed(frames.seal_packed(FrameType.MANIFEST, [[path, kind, 3, 0o644, 0, "", "", 0, 0, link, None]],
                                     self.server.key))

    @precondition(lambda self: self.accepted and not self.broken)
    @rule(data=st.binary(max_size=2000), flip=st.integers(0, 4000), key_ok=st.booleans())
    def data_frame(self, data, flip, key_ok):
        pieces, _, _ = frames.seal_chunk(0, 0, data, self.server.key if key_ok else WRONG, False)
        raw = bytearray(b"".join(bytes(p) for p in pieces))
        if flip < len(raw) and flip % 3 == 0:
            raw[flip] ^= 0x40
        self.feed(bytes(raw))

    @invariant()
    def never_accepts_without_the_key(self):
        if self.accepted:
            self.assertTrue_(self.proved)

    @invariant()
    def buffers_at_most_one_frame(self):
        assert self.splitter.buffered <= (1 << 20) + frames.HEADER.size + frames.TAG_SIZE + 300 + 4000

    def assertTrue_(self, value):
        assert value, "the receiver accepted a sender that did not prove the key"


class ReceiverDecoderTests(unittest.SynchronousTestCase):
    def test_state_machine(self):
        run_state_machine_as_test(ReceiverDecoder, settings=settings(
            max_examples=150, stateful_step_count=25, deadline=None,
            suppress_health_check=list(HealthCheck)))
