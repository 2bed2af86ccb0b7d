"""safetensors files: written whole (export), read by byte range (import).

The reader parses the format itself (8-byte little-endian header length, a JSON header of
``{name: {dtype, shape, data_offsets}}``, then the raw row-major bytes) so that each rank reads only
the rows of dim 0 its shard needs, through fsspec: the same code for a local directory and
``s3://`` (range GETs)."""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Dict, List, Optional, Tuple

import torch

from checkpointing.errors import CheckpointError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def write_hf_dir(tensors: Dict[str, torch.Tensor], config: Dict[str, Any], out_dir: str,
                 max_shard_bytes: int) -> List[str]:
    """safetensors (sharded with an index when over ``max_shard_bytes``) + config.json, locally."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    written = []
    names = [SINGLE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    total = 0
    for fname, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        written.append(fname)
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    if len(shards) > 1:
        with open(os.path.join(out_dir, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        written.append(INDEX)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    written.append("config.json")
    return written


class HFDir:
    """An HF model directory (local path or fsspec URL): its config.json and tensors by row range."""

    def __init__(self, path: str, storage_options: Optional[Dict[str, Any]] = None):
        import fsspec

        from checkpointing.storage import fsspec_options

        self.path = path.rstrip("/")
        # Our S3 short names (endpoint_url, region, ...) as checkpoint.storage_options takes them.
        self.fs, self.root = fsspec.core.url_to_fs(self.path, **fsspec_options(self.path, storage_options))
        self._headers: Dict[str, Tuple[int, Dict[str, Any]]] = {}
        if not self.fs.exists(self._p("config.json")):
            raise CheckpointError(f"{path}: no config.json (not a Hugging Face model directory)")
        self.config: Dict[str, Any] = json.loads(self._read_text("config.json"))
        if self.fs.exists(self._p(INDEX)):
            self.weight_map: Dict[str, str] = json.loads(self._read_text(INDEX))["weight_map"]
        elif self.fs.exists(self._p(SINGLE)):
            self.weight_map = {name: SINGLE for name in self._header(SINGLE)[1]}
        else:
            raise CheckpointError(f"{path}: neither {SINGLE} nor {INDEX} (only safetensors weights are read)")

    def _p(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _read_text(self, name: str) -> str:
        with self.fs.open(self._p(name), "rb") as f:
            return f.read().decode()

    def _header(self, fname: str) -> Tuple[int, Dict[str, Any]]:
        if fname not in self._headers:
            with self.fs.open(self._p(fname), "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            self._headers[fname] = (8 + n, header)
        return self._headers[fname]

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def _entry(self, name: str) -> Tuple[str, int, Dict[str, Any]]:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        fname = self.weight_map[name]
        base, header = self._header(fname)
        return fname, base, header[name]

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._entry(name)[2]["shape"])

    def read_block(self, name: str, i: int, start: int, stop: int) -> torch.Tensor:
        """``t[i, start:stop]`` of a tensor of rank >= 2 (one expert's gate or up half of a fused
        ``gate_up_proj``), reading only its bytes."""
        fname, base, e = self._entry(name)
        shape = list(e["shape"])
        row = (e["data_offsets"][1] - e["data_offsets"][0]) // max(shape[0] * shape[1], 1)
        return self._read(name, fname, base + e["data_offsets"][0] + (i * shape[1] + start) * row,
                          (stop - start) * row, e["dtype"], [stop - start] + shape[2:])

    def _read(self, name: str, fname: str, offset: int, n: int, dtype_name: str, shape: List[int]) -> torch.Tensor:
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            raise CheckpointError(f"{self.path}: {name} has dtype {dtype_name}, not one read here")
        if n <= 0:
            return torch.empty(shape, dtype=dtype)
        with self.fs.open(self._p(fname), "rb") as f:
            f.seek(offset)
            buf = bytearray(f.read(n))
        if len(buf) != n:
            raise CheckpointError(f"{self.path}/{fname}: truncated reading {name}")
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def read_rows(self, name: str, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Rows ``start:stop`` of dim 0 (the whole tensor by default), reading only their bytes."""
        fname, base, e = self._entry(name)
        shape = list(e["shape"])
        lo, hi = e["data_offsets"]
        if not shape:
            return self._read(name, fname, base + lo, hi - lo, e["dtype"], [])
        stop = shape[0] if stop is None else stop
        row = (hi - lo) // max(shape[0], 1)
        return self._read(name, fname, base + lo + start * row, (stop - start) * row, e["dtype"],
                          [max(stop - start, 0)] + shape[1:])
