"""TFRecord files of `tf.train.Example`s, written and read without importing TensorFlow.

The record framing (length, masked crc32c, data, masked crc32c) and the Example protobuf are
small, stable wire formats; encoding them here keeps the shard stage fast to start and light
on memory in every worker process. Training reads shards with TensorFlow's own readers
(`tf.data.TFRecordDataset`); the reader here is for ingesting TFRecords users bring from the
TF Object Detection API (`formats/tfrecord.py`), where starting TensorFlow would cost more
than the parse.
"""

from __future__ import annotations

import functools
import os
import struct
from typing import BinaryIO, Iterator, Sequence

import google_crc32c

Feature = Sequence[bytes] | Sequence[float] | Sequence[int]


_SMALL = tuple(bytes([n]) for n in range(128))  # one-byte varints: most lengths and tags


def _varint(value: int) -> bytes:
    if 0 <= value < 128:
        return _SMALL[value]
    value &= (1 << 64) - 1  # negative int64 -> two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def bytes_feature(values: Sequence[bytes]) -> bytes:
    return _field(1, b"".join([_field(1, v) for v in values]))


def float_feature(values: Sequence[float]) -> bytes:
    packed = struct.pack(f"<{len(values)}f", *values)
    return _field(2, _field(1, packed) if values else b"")


def int64_feature(values: Sequence[int]) -> bytes:
    packed = b"".join([_varint(int(v)) for v in values])
    return _field(3, _field(1, packed) if values else b"")


@functools.lru_cache(maxsize=256)
def _key_field(key: str) -> bytes:
    return _field(1, key.encode())


def feature_entry(key: str, value: bytes) -> bytes:
    """One entry of an Example's feature map, as `encode_example` writes it."""
    return _field(1, _key_field(key) + _field(2, value))


def encode_example(features: dict[str, bytes]) -> bytes:
    """Serialize an Example from {key: encoded Feature} (use the *_feature helpers)."""
    return example_of(b"".join([feature_entry(key, value)
                                for key, value in sorted(features.items())]))


def example_of(entries: bytes) -> bytes:
    """An Example from its feature-map entries, already in key order."""
    return _field(1, entries)


def example_entries(example: bytes) -> memoryview:
    """The feature-map entries of an Example `example_of` wrote; ValueError if it is not one."""
    view = memoryview(example)
    if not view or view[0] != 0x0A:
        raise ValueError("not an encoded Example")
    size, pos = _read_varint(view, 1)
    if pos + size != len(view):
        raise ValueError("Example length does not match its header")
    return view[pos:]


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_record(stream: BinaryIO, data: bytes) -> int:
    """Append one TFRecord; return the bytes written."""
    header = struct.pack("<Q", len(data))
    stream.write(header)
    stream.write(struct.pack("<I", _masked_crc(header)))
    stream.write(data)
    stream.write(struct.pack("<I", _masked_crc(data)))
    return len(data) + 16


# --- reading -----------------------------------------------------------------------------

def read_record_at(fd: int, offset: int, length: int) -> bytes | None:
    """The data of the record of `length` bytes at `offset` of the open file `fd`, or None
    when it is not there intact (short file, either checksum failing)."""
    frame = os.pread(fd, length + 16, offset)
    if len(frame) != length + 16:
        return None
    header, data = frame[:8], frame[12:12 + length]
    if struct.unpack("<Q", header)[0] != length or \
            _masked_crc(header) != struct.unpack("<I", frame[8:12])[0] or \
            _masked_crc(data) != struct.unpack("<I", frame[12 + length:])[0]:
        return None
    return data


MAX_RECORD_BYTES = 1 << 30  # a length beyond this is corruption, not a real Example


class RecordFramingError(ValueError):
    """The framing is broken at `offset`: the records after it cannot be found."""

    def __init__(self, offset: int, reason: str):
        super().__init__(f"corrupt TFRecord: {reason} at byte {offset}")
        self.offset = offset


def read_records(stream: BinaryIO) -> Iterator[tuple[int, bytes | None]]:
    """(byte offset, data) per record; data is None when only that record's checksum fails.

    A bad length checksum or a cut-off record breaks the framing: `RecordFramingError` is
    raised there, after every good record before it was yielded.
    """
    offset = 0
    while True:
        header = stream.read(12)
        if not header:
            return
        if len(header) < 12:
            raise RecordFramingError(offset, f"truncated record header ({len(header)} of 12 "
                                             "bytes)")
        (length,), (length_crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I",
                                                                                   header[8:])
        if _masked_crc(header[:8]) != length_crc:
            raise RecordFramingError(offset, "length checksum mismatch (not a TFRecord file, "
                                             "or damaged)")
        if length > MAX_RECORD_BYTES:
            raise RecordFramingError(offset, f"record length {length} bytes is implausible")
        data = stream.read(length)
        footer = stream.read(4)
        if len(data) < length or len(footer) < 4:
            raise RecordFramingError(offset, f"truncated record ({len(data)} of {length} "
                                             "bytes)")
        yield offset, data if _masked_crc(data) == struct.unpack("<I", footer)[0] else None
        offset += length + 16


def is_record_head(head: bytes) -> bool:
    """True if `head` starts with a TFRecord header whose length checksum holds."""
    return len(head) >= 12 and _masked_crc(head[:8]) == struct.unpack("<I", head[8:12])[0]


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("malformed varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of one protobuf message; ValueError if malformed."""
    pos = 0
    while pos < len(data):
        tag, pos = _read_varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > len(data):
                raise ValueError("truncated fixed-width field")
            value, pos = data[pos:pos + size], pos + size
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise ValueError("truncated length-delimited field")
            value, pos = data[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _feature_values(data: memoryview) -> list[bytes] | list[float] | list[int]:
    """The values of one Feature (bytes_list 1, float_list 2, int64_list 3), packed or not."""
    values: list = []
    for kind, wire, payload in _fields(data):
        if kind not in (1, 2, 3) or wire != 2:
            raise ValueError(f"unknown Feature field {kind}")
        for number, item_wire, item in _fields(payload):
            if number != 1:
                continue
            if kind == 1 and item_wire == 2:
                values.append(bytes(item))
            elif kind == 2 and item_wire == 2:  # packed floats
                if len(item) % 4:
                    raise ValueError("packed float list is not a multiple of 4 bytes")
                values.extend(struct.unpack(f"<{len(item) // 4}f", item))
            elif kind == 2 and item_wire == 5:
                values.append(struct.unpack("<f", item)[0])
            elif kind == 3 and item_wire == 2:  # packed varints
                pos = 0
                while pos < len(item):
                    value, pos = _read_varint(item, pos)
                    values.append(_signed(value))
            elif kind == 3 and item_wire == 0:
                values.append(_signed(item))
            else:
                raise ValueError(f"wire type {item_wire} in a {('bytes', 'float', 'int64')[kind - 1]}"
                                 " list")
    return values


def decode_example(data: bytes) -> dict[str, list]:
    """{key: values} of a serialized tf.train.Example; ValueError if it is not one.

    Parsed over a memoryview, so an image of megabytes is copied once, into its value."""
    features: dict[str, list] = {}
    for number, wire, payload in _fields(memoryview(data)):
        if number != 1 or wire != 2:
            raise ValueError(f"not a tf.train.Example: field {number} (wire type {wire})")
        for entry_number, entry_wire, entry in _fields(payload):
            if entry_number != 1 or entry_wire != 2:
                raise ValueError("not a tf.train.Features map entry")
            key, value = None, memoryview(b"")
            for part, part_wire, content in _fields(entry):
                if part == 1 and part_wire == 2:
                    key = bytes(content).decode("utf-8")
                elif part == 2 and part_wire == 2:
                    value = content
            if key is None:
                raise ValueError("feature without a key")
            features[key] = _feature_values(value)
    return features
