"""The consistent copy an async save writes: a device snapshot, then reusable pinned host buffers.

Where the loop used to block (issue 17, one H200, 23.6 GB ``dsv3_mini`` state): every save staged
into freshly allocated host memory (pageable, or pinned anew per save), so the step paid for
allocating and first-touching 23.6 GB as well as for the copy. Here the host buffers are allocated
once per state layout and reused by every later save (a save never starts while the previous one
is still writing them: the manager's ``checkpoint.if_busy`` policy skips or defers it instead).

``stage`` copies every tensor once and returns a Future of the host copy:

* ``device=True`` (``checkpoint.staging=device``): accelerator tensors are cloned on their own
  stream (a device-to-device copy, ordered before the next optimizer step by the stream itself, so
  the host never waits for it); a background thread copies the clones into the pinned buffers on
  a side stream, then frees them. The training step pays only for launching the clones.
* ``device=False`` (``staging=host``): the background thread copies the live tensors straight to
  the pinned buffers; the trainer waits for that Future before its next optimizer step.
* CPU tensors (a CPU run, AdamW's step counters) are copied synchronously: there is no stream to
  order the copy against the next update.

Buffers are in shared memory when ``shared=True``, so a writer process reads them without a copy
(DCP's process daemon or :mod:`checkpointing.writer_process`), and page-locked with
``cudaHostRegister`` when CUDA is present (the same call DCP's own stager uses), so the
device-to-host copy runs at PCIe speed without a bounce buffer.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

log = logging.getLogger(__name__)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def tensor_leaves(obj: Any, out: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
    """Every tensor of a nested state, in a fixed traversal order (DTensors as themselves)."""
    out = [] if out is None else out
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            tensor_leaves(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            tensor_leaves(v, out)
    return out


def state_bytes(obj: Any) -> int:
    """Bytes of this rank's tensors in a nested state (DTensors: the local shard)."""
    return sum(_local(t).numel() * _local(t).element_size() for t in tensor_leaves(obj))


def rebuild(obj: Any, tensors: List[torch.Tensor], as_plain: bool = False) -> Any:
    """``obj`` with its tensor leaves replaced, in :func:`tensor_leaves` order, by ``tensors`` (local
    shards; re-wrapped as DTensors like the originals unless ``as_plain``). Primitives are kept as
    they are now: the copy is of this moment's hyper-parameters too."""
    from torch.distributed.tensor import DTensor

    it = iter(tensors)

    def go(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            new = next(it)
            if isinstance(o, DTensor) and not as_plain:
                return DTensor.from_local(new, o.device_mesh, o.placements, run_check=False,
                                          shape=o.shape, stride=o.stride())
            return new
        if isinstance(o, Mapping):
            return {k: go(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return type(o)(go(v) for v in o)
        return o

    return go(obj)


def _pin(t: torch.Tensor) -> None:
    """Page-lock ``t``'s memory in place (shared-memory tensors cannot use ``pin_memory()``, which
    copies; and the caching host allocator would round every buffer up to a power of two)."""
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 1)) != 0:  # 1: portable
        raise RuntimeError(f"cudaHostRegister of {t.numel() * t.element_size()} bytes failed")
    ptr = t.data_ptr()
    weakref.finalize(t.untyped_storage(), lambda: cudart.cudaHostUnregister(ptr))


def _signature(locals_: List[torch.Tensor]) -> Tuple:
    return tuple((tuple(t.shape), t.dtype) for t in locals_)


class SnapshotStager:
    """Duck-typed DCP ``AsyncStager`` (stage / synchronize_staging / close), persistent across
    saves. ``timings`` of the last stage: ``snapshot_s`` (in the caller) and ``host_s`` (stage
    start -> host copy complete)."""

    _synchronize_after_execute = False
    should_synchronize_after_execute = False

    def __init__(self, device: bool = True, shared: bool = False):
        self.device, self.shared = device, shared
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeforge-d2h")
        self._bufs: List[torch.Tensor] = []
        self._sig: Optional[Tuple] = None
        self._lock = threading.Lock()  # buffers are (re)allocated by one thread at a time
        self.timings: Dict[str, float] = {}
        self.as_plain = False  # a writer process gets plain tensors (it has no device mesh)

    # -- buffers --------------------------------------------------------------------------------
    def _buffers(self, locals_: List[torch.Tensor]) -> List[torch.Tensor]:
        sig = _signature(locals_)
        with self._lock:
            if sig != self._sig:
                t0 = time.perf_counter()
                self._bufs = []  # release the old layout's memory before allocating the new one
                pin = torch.cuda.is_available() and any(t.is_cuda for t in locals_)
                bufs = []
                for t in locals_:
                    b = torch.empty(t.shape, dtype=t.dtype, device="cpu")
                    if self.shared:
                        b.share_memory_()
                    if pin and t.is_cuda:
                        _pin(b)
                    bufs.append(b)
                self._bufs, self._sig = bufs, sig
                nbytes = sum(b.numel() * b.element_size() for b in bufs)
                log.info("checkpoint host buffers: %.2f GB%s%s, allocated once in %.1f s and reused by every save",
                         nbytes / 1e9, " pinned" if pin else "", " shared" if self.shared else "",
                         time.perf_counter() - t0)
            return self._bufs

    def prepare(self, state: Any) -> Future:
        """Allocate (and pin) the host buffers for ``state``'s layout in the background, so the
        first save (or an emergency one) does not pay for it."""
        locals_ = [_local(t) for t in tensor_leaves(state)]
        meta = [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in locals_]
        cuda = [t.is_cuda for t in locals_]

        class _Like:  # shape/dtype/is_cuda of the live tensors, without holding them
            def __init__(self, m, c):
                self.shape, self.dtype, self.is_cuda = m.shape, m.dtype, c

        return self._pool.submit(self._buffers, [_Like(m, c) for m, c in zip(meta, cuda)])

    # -- staging --------------------------------------------------------------------------------
    def stage(self, state_dict: Any) -> Future:
        t0 = time.perf_counter()
        leaves = tensor_leaves(state_dict)
        locals_ = [_local(t).detach() for t in leaves]
        on_cuda = [t.is_cuda for t in locals_]
        if not any(on_cuda):  # a CPU run: this copy into the reused buffers is the snapshot
            bufs = self._buffers(locals_)
            for b, t in zip(bufs, locals_):
                b.copy_(t)
            self.timings = {"snapshot_s": time.perf_counter() - t0}
            self.timings["host_s"] = self.timings["snapshot_s"]
            done: Future = Future()
            done.set_result(rebuild(state_dict, bufs, self.as_plain))
            return done
        # CPU leaves (AdamW's step counters) are cloned now: no stream orders a later copy before
        # the update. Device leaves: cloned on their stream (staging=device), or read in place by
        # the background copy while the trainer waits for it (staging=host).
        src = [t.clone() if (self.device or not c) else t for t, c in zip(locals_, on_cuda)]
        event = torch.cuda.Event()
        event.record()
        self.timings = {"snapshot_s": time.perf_counter() - t0}
        return self._pool.submit(self._to_host, state_dict, src, on_cuda, event, t0)

    def _to_host(self, state_dict: Any, src: List[torch.Tensor], on_cuda: List[bool],
                 event: "torch.cuda.Event", t0: float) -> Any:
        bufs = self._buffers(src)
        side = torch.cuda.Stream(device=next(t.device for t, c in zip(src, on_cuda) if c))
        side.wait_event(event)  # the clones (device) or the live values (host staging) are ready
        with torch.cuda.stream(side):
            for b, t, c in zip(bufs, src, on_cuda):
                b.copy_(t, non_blocking=c)
        side.synchronize()
        del src  # device staging: the snapshot's memory goes back to the caching allocator
        self.timings["host_s"] = time.perf_counter() - t0
        return rebuild(state_dict, bufs, self.as_plain)

    def synchronize_staging(self) -> None:
        """Nothing to do here: callers wait on the Future ``stage`` returned when they must."""

    def close(self) -> None:
        self._pool.shutdown(wait=True)
