#!/usr/bin/env python3
"""Interop fixtures for tidepool's wire protocol, made with Python's `msgpack` package.

This script knows nothing of the Rust code: it builds frames from the byte-level rules in
PROTOCOL.md with an independent MessagePack encoder, and reads frames the Rust encoder
wrote. Together with protocol/tests/interop.rs it shows the format is plain MessagePack.

    python interop.py write DIR   # py_*.bin: frames made here, decoded by the Rust test
    python interop.py check DIR   # rust_*.bin: frames made by Rust, checked here
    python interop.py hex         # the hex dumps quoted in PROTOCOL.md
"""
import struct
import sys
from pathlib import Path

import msgpack


def f32(*values):
    return struct.pack("<%df" % len(values), *values)


# The messages both sides agree on, keyed by fixture name.
EXPECTED = {
    "infer": {
        "type": "infer",
        "id": 1,
        "inputs": {"x": {"dtype": "f32", "shape": [2, 3], "data": f32(0.5, 1, 1.5, 2, 2.5, 3)}},
        "deadline_ms": 100,
    },
    "result": {
        "type": "result",
        "id": 1,
        "outputs": {"y": {"dtype": "f32", "shape": [2], "data": f32(0.25, -1)}},
        "queue_us": 150,
        "infer_us": 4200,
        "batch_size": 8,
        "worker": "worker-1",
    },
    "error": {
        "type": "error",
        "id": 2,
        "code": "overloaded",
        "message": "queue full (1024 items); retry later",
        "retry_after_ms": 50,
    },
    "cancel": {"type": "cancel", "id": 3},
    "ping": {"type": "ping", "id": 4},
    "pong": {"type": "pong", "id": 4},
    "metadata": {"type": "metadata", "id": 6},
    "metadata_result": {
        "type": "metadata_result",
        "id": 6,
        "worker": "worker-1",
        "model": {
            "name": "encoder",
            "version": "2",
            "platform": "onnxruntime",
            "inputs": [
                {"name": "input_ids", "dtype": "i64", "shape": [-1], "dims": ["sequence"]},
                {"name": "attention_mask", "dtype": "i64", "shape": [-1], "dims": ["sequence"]},
            ],
            "outputs": [{"name": "embedding", "dtype": "f32", "shape": [4], "dims": [""]}],
            "batched": True,
            "max_batch": 32,
            "padding": {
                "axes": ["sequence"],
                "values": {"attention_mask": 0.0, "input_ids": 0.0},
            },
        },
    },
}

# Made only here: a later version's extra key, which a v1 reader must ignore.
PY_ONLY = {"unknown_keys": {"type": "ping", "id": 5, "trace_id": "abc", "priority": 3}}


def frame(message):
    body = msgpack.packb(message, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def unframe(data):
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 4, f"prefix says {length}, body has {len(data) - 4}"
    return msgpack.unpackb(data[4:], raw=False)


def write(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, message in {**EXPECTED, **PY_ONLY}.items():
        (folder / f"py_{name}.bin").write_bytes(frame(message))


def check(folder):
    for name, message in EXPECTED.items():
        path = folder / f"rust_{name}.bin"
        decoded = unframe(path.read_bytes())
        assert decoded == message, f"{path}: got {decoded!r}, expected {message!r}"
        for tensors in ("inputs", "outputs"):
            for tensor in decoded.get(tensors, {}).values():
                assert isinstance(tensor["data"], bytes), f"{path}: tensor data is not bin"
    print(f"ok: {len(EXPECTED)} Rust-encoded frames decoded by Python msgpack {msgpack.version}")


def hexdump():
    for name in ("infer", "result", "metadata", "metadata_result"):
        data = frame(EXPECTED[name])
        print(f"{name} ({len(data)} bytes):")
        for offset in range(0, len(data), 16):
            chunk = data[offset:offset + 16]
            print(f"  {offset:04x}  {' '.join(f'{b:02x}' for b in chunk)}")


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    command = sys.argv[1] if len(sys.argv) > 1 else "check"
    folder = Path(sys.argv[2]) if len(sys.argv) > 2 else here / "fixtures"
    {"write": lambda: write(folder), "check": lambda: check(folder), "hex": hexdump}[command]()
