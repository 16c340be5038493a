"""TFRecord files of `tf.train.Example`s, written without importing TensorFlow.

The record framing (length, masked crc32c, data, masked crc32c) and the Example protobuf are
small, stable wire formats; encoding them here keeps the shard stage fast to start and light
on memory in every worker process. Readers are TensorFlow's own (`tf.data.TFRecordDataset`).
"""

from __future__ import annotations

import struct
from typing import BinaryIO, Sequence

import google_crc32c

Feature = Sequence[bytes] | Sequence[float] | Sequence[int]


def _varint(value: int) -> bytes:
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
    return _field(1, b"".join(_field(1, v) for v in values))


def float_feature(values: Sequence[float]) -> bytes:
    packed = struct.pack(f"<{len(values)}f", *values)
    return _field(2, _field(1, packed) if values else b"")


def int64_feature(values: Sequence[int]) -> bytes:
    packed = b"".join(_varint(int(v)) for v in values)
    return _field(3, _field(1, packed) if values else b"")


def encode_example(features: dict[str, bytes]) -> bytes:
    """Serialize an Example from {key: encoded Feature} (use the *_feature helpers)."""
    entries = b"".join(_field(1, _field(1, key.encode()) + _field(2, value))
                       for key, value in sorted(features.items()))
    return _field(1, entries)


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
