"""Reads records back from a W&B ``.wandb`` transaction log (wandb ships no reader).

Format (as written by wandb-core, the same as the old Python ``datastore``): a 7-byte file header
``<4sHB`` = (b":W&B", 0xBEE1, version 0), then the LevelDB log format: 32 KiB blocks, each record
chunk has a 7-byte header ``<IHB`` = (crc32, length, type) with type FULL=1, FIRST=2, MIDDLE=3,
LAST=4; a block tail shorter than a header is zero padding. Payloads joined across chunks are
serialized ``wandb_internal_pb2.Record`` messages.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any, Dict, Iterator, List

from wandb.proto import wandb_internal_pb2 as pb

HEADER_FMT = "<4sHB"
HEADER_LEN = struct.calcsize(HEADER_FMT)
CHUNK_FMT = "<IHB"
CHUNK_LEN = struct.calcsize(CHUNK_FMT)
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_payloads(path: str, check_crc: bool = True) -> Iterator[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    ident, magic, version = struct.unpack_from(HEADER_FMT, data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a .wandb file (header {ident!r} {magic:#x})")
    pos = HEADER_LEN
    pending = b""
    while pos + CHUNK_LEN <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_LEN:
            pos += left_in_block  # zero padding at the block tail
            continue
        crc, length, kind = struct.unpack_from(CHUNK_FMT, data, pos)
        if kind == 0 and length == 0:  # pre-allocated / padding
            pos += left_in_block
            continue
        start = pos + CHUNK_LEN
        chunk = data[start : start + length]
        if len(chunk) < length:
            break  # torn tail of a file still being written
        if check_crc:
            expected = zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF
            if expected != crc:
                raise ValueError(f"{path}: CRC mismatch at offset {pos}")
        pos = start + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at offset {pos}")


def read_records(path: str) -> List[pb.Record]:
    records = []
    for payload in iter_payloads(path):
        rec = pb.Record()
        rec.ParseFromString(payload)
        records.append(rec)
    return records


def _item_key(item: pb.HistoryItem) -> str:
    return item.key if item.key else "/".join(item.nested_key)


def _item_value(item: pb.HistoryItem) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    which = item.WhichOneof("value") if "value" in [o.name for o in item.DESCRIPTOR.oneofs] else None
    if which:
        return getattr(item, which)
    return None


def read_history(path: str) -> List[Dict[str, Any]]:
    """One dict per ``run.log`` call, keyed as logged (W&B's own ``_step`` etc. included)."""
    rows = []
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({_item_key(i): _item_value(i) for i in rec.history.item})
    return rows


def read_run(path: str) -> pb.RunRecord:
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "run":
            return rec.run
    raise ValueError(f"{path}: no run record")


def wait_until_complete(path: str, timeout_s: float = 20.0) -> List[pb.Record]:
    """Records of ``path`` once its ``exit`` record is on disk.

    ``run.finish()`` can return before wandb-core has flushed the transaction log (seen with
    wandb 0.31 offline: a read right after finish sometimes found no run record yet), so poll.
    """
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = read_records(path)
        except (OSError, ValueError):
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            kinds = [r.WhichOneof("record_type") for r in records]
            raise TimeoutError(f"{path}: no exit record after {timeout_s}s (have {kinds})")
        time.sleep(0.1)
