"""The seed wire format: frames, their integrity tags, and data chunks.

Every frame is ``header | body | tag``::

    header  = type u8, flags u8, body length u32        (big-endian, 6 bytes)
    tag     = BLAKE3(key=stream key, header | covered)[:16]

For control frames ``covered`` is the whole body.  A DATA frame's body is a 49-byte chunk
head (file index u32, offset u64, raw length u32, encoding u8, content digest of the raw
bytes, 32 bytes: see :class:`Digest`) followed by the payload.  A raw payload is bound to
the tag through the digest (the tag covers header and chunk head), so one hash pass over
the data on each side both authenticates and verifies it.  A zstd payload is covered by
the tag as well and checked before it is decompressed: nothing unauthenticated reaches
the decompressor, and every flipped bit is caught even where it would not change the
output.  The content digest does not depend on the stream key: the receiver keeps it in
its journal and compares it again after a restart.

Small files travel together in BUNDLE frames: a head (count u32, encoding u8, raw length
u32), one item per file (file index u32, length u32, content digest) and the files' bytes
one after the other (raw or zstd as a whole), tagged like a DATA frame.  One frame per
megabyte instead of one per file keeps the per-file cost on both sides to the system
calls the file needs.

The stream key is all-zero during the handshake (integrity only) and afterwards derived
from both sides' nonces and, when the controller gave one, the per-seed key (see
:mod:`orchagent.seed.auth`): then nobody without the key can forge or splice a frame.

:class:`FrameSplitter` only cuts bytes into frames (cheap, runs on the reactor thread);
:func:`open_control`, :func:`open_data` and :func:`unpack_chunk` check them (the last one
hashes and decompresses, so it runs in a worker thread).  Nothing here does I/O.
"""

from __future__ import annotations

import enum
import json
import struct
import threading
from collections import deque
from typing import Any, Iterable

import attrs
import blake3
import xxhash
import zstandard

HEADER = struct.Struct(">BBI")
CHUNK_HEAD = struct.Struct(">IQIB32s")
BUNDLE_HEAD = struct.Struct(">IBI")
BUNDLE_ITEM = struct.Struct(">II32s")
MAX_BUNDLE_ITEMS = 4096
TAG_SIZE = 16
ZERO_KEY = bytes(32)
#: The largest raw chunk; bodies are at most this plus the chunk head.
MAX_CHUNK = 8 << 20
MAX_BODY = MAX_CHUNK + CHUNK_HEAD.size
#: A compressed chunk is sent only when it saves at least 1/16th.
MIN_SAVING = 16


class FrameType(enum.IntEnum):
    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    ACCEPT = 4
    REJECT = 5
    MANIFEST = 6
    MANIFEST_END = 7
    READY = 8
    DATA = 9
    DIGESTS = 10
    FINISH = 11
    RESULT = 12
    ABORT = 13
    BUNDLE = 14


class Encoding(enum.IntEnum):
    RAW = 0
    ZSTD = 1


class Digest(enum.IntEnum):
    """How chunk contents are digested (32 bytes on the wire either way).

    BLAKE3 where the frames are the stream's only authentication (a per-seed key without
    TLS): the digest is what binds a raw payload to its keyed tag, so it must resist a
    forger.  XXH3-128 (16 bytes, zero-padded) where it only has to catch corruption: under
    TLS, which authenticates every byte itself, and on an unauthenticated stream, where
    nothing could.  It costs a tenth of BLAKE3, which on loopback was a fifth of each
    side's CPU time.  Tags (keyed) are always BLAKE3."""

    BLAKE3 = 0
    XXH3 = 1

    @property
    def label(self) -> str:
        return "blake3" if self is Digest.BLAKE3 else "xxh3-128"

    @classmethod
    def for_stream(cls, keyed: bool, tls: bool) -> "Digest":
        """What a stream with a per-seed key (``keyed``) and seed TLS or not digests with."""
        return cls.BLAKE3 if keyed and not tls else cls.XXH3

    @classmethod
    def from_label(cls, label: str) -> "Digest":
        for kind in cls:
            if kind.label == label:
                return kind
        raise ValueError(f"unknown content digest {label!r}")


_XXH3_PAD = bytes(16)


def content_digest(data, kind: int = Digest.BLAKE3) -> bytes:
    """The 32-byte content digest of ``data`` (any buffer)."""
    if kind == Digest.XXH3:
        return xxhash.xxh3_128_digest(data) + _XXH3_PAD
    return blake3.blake3(data).digest()


def _parts_digest(parts, kind: int) -> bytes:
    """:func:`content_digest` of buffers one after the other, hashed piece by piece."""
    h = xxhash.xxh3_128() if kind == Digest.XXH3 else blake3.blake3()
    for part in parts:
        h.update(part)
    return h.digest() + _XXH3_PAD if kind == Digest.XXH3 else h.digest()


class ProtocolError(Exception):
    """The peer broke the protocol; the stream cannot be trusted any more."""


class IntegrityError(ProtocolError):
    """A tag or digest did not match: corruption or forgery.  ``where`` names the place."""

    def __init__(self, message: str, where: tuple[int, int] | None = None):
        super().__init__(message)
        self.where = where


@attrs.frozen
class Frame:
    """One cut frame (header, body and tag) as the buffers it arrived in.

    DATA frames stay in pieces: the payload goes to disk with one ``pwritev`` and is
    hashed piece by piece, never copied into one buffer.  Control frames are small and
    joined when checked (:func:`open_control`).
    """

    type: int
    flags: int
    parts: tuple
    size: int


@attrs.frozen
class Chunk:
    """A DATA frame whose tag was checked; the payload (buffers) is not verified yet."""

    file: int
    offset: int
    length: int
    encoding: int
    digest: bytes
    payload: tuple
    #: The whole frame's size on the wire.
    size: int
    #: For a zstd payload, what its tag check (in :func:`unpack_chunk`) needs.
    head: bytes = b""
    tag: bytes = b""
    key: bytes = attrs.field(default=ZERO_KEY, repr=False)
    kind: int = Digest.BLAKE3

    @property
    def where(self) -> tuple[int, int]:
        return (self.file, self.offset)


def _slice(parts, start: int, end: int) -> list[memoryview]:
    """The bytes [start, end) of a sequence of buffers, as views (no copy)."""
    out = []
    position = 0
    for part in parts:
        size = len(part)
        lo, hi = max(start - position, 0), min(end - position, size)
        if lo < hi:
            out.append(part[lo:hi])
        position += size
        if position >= end:
            break
    return out


def _tag(key: bytes, *parts) -> bytes:
    h = blake3.blake3(key=key)
    for part in parts:
        h.update(part)
    return h.digest(length=TAG_SIZE)


def seal(ftype: int, body: bytes, key: bytes = ZERO_KEY, flags: int = 0) -> bytes:
    """A complete control frame."""
    if len(body) > MAX_BODY:
        raise ValueError(f"frame body of {len(body)} bytes is too large")
    head = HEADER.pack(ftype, flags, len(body))
    return head + body + _tag(key, head, body)


def seal_json(ftype: int, value: Any, key: bytes = ZERO_KEY) -> bytes:
    return seal(ftype, json.dumps(value, separators=(",", ":")).encode(), key)


def seal_body(ftype: int, body: bytes | dict, key: bytes = ZERO_KEY) -> bytes:
    """A control frame of ``body``: bytes as they are, a dict as JSON."""
    return seal(ftype, body, key) if isinstance(body, bytes) else seal_json(ftype, body, key)


def seal_packed(ftype: int, value: Any, key: bytes = ZERO_KEY) -> bytes:
    """A control frame whose body is zstd-compressed JSON (manifests, chunk lists)."""
    raw = json.dumps(value, separators=(",", ":")).encode()
    return seal(ftype, _compressor().compress(raw), key)


def open_control(frame: Frame, key: bytes = ZERO_KEY) -> bytes:
    """The body of a control frame, after checking its tag."""
    if frame.type in (FrameType.DATA, FrameType.BUNDLE):
        raise ProtocolError("a data frame where a control frame was expected")
    raw = frame.parts[0] if len(frame.parts) == 1 else memoryview(b"".join(frame.parts))
    if _tag(key, raw[:len(raw) - TAG_SIZE]) != raw[len(raw) - TAG_SIZE:]:
        raise IntegrityError(f"{_name(frame.type)} frame failed its integrity check")
    return bytes(raw[HEADER.size:frame.size - TAG_SIZE])


def open_json(frame: Frame, key: bytes = ZERO_KEY) -> Any:
    try:
        value = json.loads(open_control(frame, key))
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"{_name(frame.type)} frame does not hold valid JSON") from e
    if not isinstance(value, dict):
        raise ProtocolError(f"{_name(frame.type)} frame does not hold a JSON object")
    return value


def open_packed(frame: Frame, key: bytes = ZERO_KEY, limit: int = 256 << 20) -> Any:
    body = open_control(frame, key)
    try:
        return json.loads(_decompressor().decompress(body, max_output_size=limit))
    except (zstandard.ZstdError, ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"{_name(frame.type)} frame does not hold packed JSON") from e


def seal_chunk(file: int, offset: int, raw, key: bytes, compress: bool,
               kind: int = Digest.BLAKE3) -> tuple[list, bytes, bool]:
    """Frame one chunk (worker thread): (pieces to write, content digest, compressed or
    not).  ``raw`` may be any buffer; it is neither copied nor kept."""
    length = len(raw)
    if length > MAX_CHUNK:
        raise ValueError(f"chunk of {length} bytes is larger than {MAX_CHUNK}")
    digest = content_digest(raw, kind)
    packed = _packed(raw, compress)
    chunk_head = CHUNK_HEAD.pack(file, offset, length, _encoding(packed), digest)
    return _sealed(FrameType.DATA, chunk_head, raw, packed, key), digest, packed is not None


def _packed(raw, compress: bool) -> bytes | None:
    """``raw`` compressed, when asked and when that saves at least 1/MIN_SAVING."""
    if compress and len(raw):
        packed = _compressor().compress(raw)
        if len(packed) <= len(raw) - len(raw) // MIN_SAVING:
            return packed
    return None


def _encoding(packed: bytes | None) -> int:
    return Encoding.RAW if packed is None else Encoding.ZSTD


def _sealed(ftype: int, head_body: bytes, raw, packed: bytes | None, key: bytes) -> list:
    """A DATA or BUNDLE frame's pieces: its tag covers the header and ``head_body``, and
    a compressed payload too (a raw one is bound to the tag through its digests)."""
    payload = raw if packed is None else packed
    head = HEADER.pack(ftype, 0, len(head_body) + len(payload))
    tag = _tag(key, head, head_body) if packed is None else _tag(key, head, head_body, payload)
    return [head, head_body, payload, tag]


@attrs.frozen
class Bundle:
    """A BUNDLE frame whose head was read (and, when raw, its tag checked)."""

    items: tuple
    encoding: int
    raw_length: int
    payload: tuple
    size: int
    head: bytes = b""
    tag: bytes = b""
    key: bytes = attrs.field(default=ZERO_KEY, repr=False)
    kind: int = Digest.BLAKE3

    @property
    def where(self) -> tuple[int, int]:
        return (self.items[0][0], 0)


def seal_bundle(files: list, raw, key: bytes, compress: bool,
                kind: int = Digest.BLAKE3) -> tuple[list, list[bytes], bool]:
    """Frame whole small files as one BUNDLE (worker thread): ``files`` are ``[(file
    index, length)]`` whose bytes follow each other in ``raw``.  Returns (pieces, their
    digests, compressed or not)."""
    view = memoryview(raw)
    digests = []
    position = 0
    for _, length in files:
        digests.append(content_digest(view[position:position + length], kind))
        position += length
    packed = _packed(raw, compress)
    head_body = BUNDLE_HEAD.pack(len(files), _encoding(packed), len(raw)) + b"".join(
        BUNDLE_ITEM.pack(index, length, digest) for (index, length), digest in zip(files, digests))
    # Transports take bytes only (a copy made only when sent raw).
    raw = bytes(raw) if packed is None else raw
    return _sealed(FrameType.BUNDLE, head_body, raw, packed, key), digests, packed is not None


def open_bundle(frame: Frame, key: bytes, kind: int = Digest.BLAKE3) -> Bundle:
    """Read a BUNDLE's head; check its tag when the payload is raw (cheap, any thread)."""
    start = HEADER.size + BUNDLE_HEAD.size
    if frame.size < start + TAG_SIZE:
        raise ProtocolError("BUNDLE frame shorter than its head")
    count, encoding, raw_length = BUNDLE_HEAD.unpack(b"".join(_slice(frame.parts, HEADER.size, start)))
    end = start + count * BUNDLE_ITEM.size
    if not 0 < count <= MAX_BUNDLE_ITEMS or frame.size < end + TAG_SIZE or raw_length > MAX_CHUNK \
            or encoding not in (Encoding.RAW, Encoding.ZSTD):
        raise ProtocolError("BUNDLE frame has an impossible head")
    head, payload, tag = _split(frame, end)
    items = tuple(BUNDLE_ITEM.unpack_from(head, start + i * BUNDLE_ITEM.size) for i in range(count))
    if encoding == Encoding.RAW and _tag(key, head) != tag:
        raise IntegrityError(f"BUNDLE frame starting with file #{items[0][0]} failed its integrity check",
                             where=(items[0][0], 0))
    if sum(length for _, length, _ in items) != raw_length or (
            encoding == Encoding.RAW and frame.size - end - TAG_SIZE != raw_length):
        raise ProtocolError("BUNDLE frame lengths do not add up")
    return Bundle(items, encoding, raw_length, payload, frame.size, head, tag, key, kind)


def unpack_bundle(bundle: Bundle) -> list:
    """``[(file index, bytes or IntegrityError)]``: each file checked against its digest
    (worker thread)."""
    parts = list(bundle.payload)
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    if bundle.encoding == Encoding.ZSTD:
        name = f"BUNDLE frame starting with file #{bundle.items[0][0]}"
        data = _decompress(bundle, data, bundle.raw_length, bundle.where, name, name)
    view = memoryview(data)
    out = []
    position = 0
    for index, length, digest in bundle.items:
        piece = view[position:position + length]
        position += length
        if content_digest(piece, bundle.kind) == digest:
            out.append((index, piece))
        else:
            out.append((index, IntegrityError(f"file #{index} in a bundle does not match its digest",
                                              where=(index, 0))))
    return out


def open_data(frame: Frame, key: bytes, kind: int = Digest.BLAKE3) -> Chunk:
    """Check a DATA frame's tag (header and chunk head); cheap, any thread."""
    if frame.type != FrameType.DATA:
        raise ProtocolError(f"a {_name(frame.type)} frame where a DATA frame was expected")
    end = HEADER.size + CHUNK_HEAD.size
    if frame.size < end + TAG_SIZE:
        raise ProtocolError("DATA frame shorter than its chunk head")
    head, payload, tag = _split(frame, end)
    file, offset, length, encoding, digest = CHUNK_HEAD.unpack_from(head, HEADER.size)
    if encoding != Encoding.ZSTD and _tag(key, head) != tag:
        raise IntegrityError(f"DATA frame for file #{file} offset {offset} failed its integrity check",
                             where=(file, offset))
    if length > MAX_CHUNK or encoding not in (Encoding.RAW, Encoding.ZSTD) or (
            encoding == Encoding.RAW and frame.size - end - TAG_SIZE != length):
        raise ProtocolError(f"DATA frame for file #{file} offset {offset} has an impossible chunk head")
    return Chunk(file, offset, length, encoding, digest, payload, frame.size, head, tag, key, kind)


def _split(frame: Frame, end: int) -> tuple[bytes, tuple, bytes]:
    """A DATA or BUNDLE frame's head (``end`` bytes), its payload's buffers, its tag."""
    size = frame.size
    return (b"".join(_slice(frame.parts, 0, end)), tuple(_slice(frame.parts, end, size - TAG_SIZE)),
            b"".join(_slice(frame.parts, size - TAG_SIZE, size)))


def _decompress(framed: Chunk | Bundle, packed, length: int, where, frame: str, content: str):
    """A zstd payload, authenticated, then decompressed to exactly ``length`` bytes (its
    declared size checked first: decompress() would allocate what a corrupt header claims)."""
    if _tag(framed.key, framed.head, packed) != framed.tag:
        raise IntegrityError(f"{frame} failed its integrity check", where=where)
    try:
        declared = zstandard.frame_content_size(packed)
        if declared != length:
            raise zstandard.ZstdError(f"frame declares {declared} bytes")
        data = _decompressor().decompress(packed, max_output_size=length)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"{content} does not decompress: {e}", where=where) from None
    if len(data) != length:
        raise IntegrityError(f"{content} decompressed to {len(data)} bytes, not {length}", where=where)
    return data


def unpack_chunk(chunk: Chunk) -> list:
    """The chunk's raw bytes as buffers, decompressed and checked against its digest
    (worker thread)."""
    parts = list(chunk.payload)
    if chunk.encoding == Encoding.ZSTD:
        packed = parts[0] if len(parts) == 1 else b"".join(parts)
        parts = [_decompress(chunk, packed, chunk.length, chunk.where,
                             f"DATA frame for file #{chunk.file} offset {chunk.offset}",
                             f"chunk of file #{chunk.file} at offset {chunk.offset}")]
    if _parts_digest(parts, chunk.kind) != chunk.digest:
        raise IntegrityError(f"chunk of file #{chunk.file} at offset {chunk.offset} "
                             f"does not match its digest", where=chunk.where)
    return parts


class FrameSplitter:
    """Cuts a byte stream into frames without copying the data: pieces are kept as they
    arrived (views of the socket's read buffers), and a frame is handed out once all of
    it is there.  A length beyond ``max_body`` fails at once (never buffers it)."""

    def __init__(self, max_body: int = MAX_BODY):
        self.max_body = max_body
        self._pieces: deque = deque()
        #: Bytes received and not yet handed out as frames.
        self.buffered = 0
        self._head: tuple[int, int, int] | None = None

    def feed(self, data) -> list[Frame]:
        if data:
            self._pieces.append(memoryview(data))
            self.buffered += len(data)
        frames = []
        while True:
            if self._head is None:
                if self.buffered < HEADER.size:
                    break
                ftype, flags, length = HEADER.unpack(b"".join(_slice(self._pieces, 0, HEADER.size)))
                if length > self.max_body:
                    raise ProtocolError(f"frame length {length} exceeds the limit of {self.max_body}")
                if ftype not in _TYPES:
                    raise ProtocolError(f"unknown frame type {ftype}")
                self._head = (ftype, flags, HEADER.size + length + TAG_SIZE)
            ftype, flags, total = self._head
            if self.buffered < total:
                break
            parts = self._take(total)
            if ftype not in (FrameType.DATA, FrameType.BUNDLE) and len(parts) > 1:
                parts = [memoryview(b"".join(parts))]
            frames.append(Frame(ftype, flags, tuple(parts), total))
            self._head = None
        return frames

    def finish(self) -> None:
        """The stream ended: a partial frame left over is an error."""
        if self.buffered:
            raise ProtocolError(f"stream ended inside a frame ({self.buffered} bytes left over)")

    def _take(self, n: int) -> list[memoryview]:
        self.buffered -= n
        parts = []
        need = n
        while need:
            piece = self._pieces.popleft()
            if len(piece) > need:
                self._pieces.appendleft(piece[need:])
                piece = piece[:need]
            parts.append(piece)
            need -= len(piece)
        return parts


_TYPES = frozenset(int(t) for t in FrameType)
_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "compressor", None)
    if c is None:
        c = _local.compressor = zstandard.ZstdCompressor(level=1)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


def _name(ftype: int) -> str:
    try:
        return FrameType(ftype).name
    except ValueError:
        return f"type-{ftype}"


def iter_frames(chunks: Iterable[bytes]) -> Iterable[Frame]:
    """Every frame in a sequence of byte pieces (tests and tools)."""
    splitter = FrameSplitter()
    for piece in chunks:
        yield from splitter.feed(piece)
    splitter.finish()
