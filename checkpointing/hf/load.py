"""Import: initialise our (possibly FSDP2/EP-sharded) model from a Hugging Face directory.

Each rank reads only what its shards need: for every parameter (a DTensor under FSDP2 / EP, or a
plain tensor) we find which global indices of each sharded dim this rank holds, then read just those
rows of the HF tensor by byte range (``safetensors_io.HFDir``) and copy them into the local shard.
No rank ever holds a full model, nor a full copy of a sharded tensor (routed experts: the rank's
experts, whole or by rows). The name and layout rewrite is the export table read backwards
(``checkpointing/hf/mapping.py``), so export -> import is the identity.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set, Tuple

import torch

from checkpointing.errors import CheckpointError
from checkpointing.hf.families import for_hf_config
from checkpointing.hf.family import Family
from checkpointing.hf.mapping import Copies, Expert, Keep, Same, Source, Zero, refuse_import
from checkpointing.hf.safetensors_io import HFDir

if TYPE_CHECKING:  # annotations only: model/ is imported where it is used
    from model.config import ModelConfig

log = logging.getLogger(__name__)

_WRAPPERS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
_PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def model_config_from_hf(path: str, storage_options: Optional[Dict[str, Any]] = None) -> ModelConfig:
    """Our ``ModelConfig`` for the HF directory at ``path`` (refuses what we cannot express)."""
    hf = HFDir(path, storage_options)
    return for_hf_config(hf.config).model_config(hf.config)


def _clean(name: str) -> str:
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name


def _local_indices(p: torch.Tensor) -> List[Optional[torch.Tensor]]:
    """Per dim, the global indices this rank holds (None = the whole dim). Found by sharding a small
    index probe exactly as ``p`` is sharded (public DTensor API, any placement including FSDP2's
    uneven last shard and strided shards): only the sharded dims are materialised."""
    mesh = getattr(p, "device_mesh", None)
    if mesh is None:
        return [None] * p.dim()
    from torch.distributed.tensor import distribute_tensor

    sharded = sorted({pl.dim for pl in p.placements if pl.is_shard()})
    out: List[Optional[torch.Tensor]] = [None] * p.dim()
    probe_shape = [n if i in sharded else 1 for i, n in enumerate(p.shape)]
    for d in sharded:
        axis = [-1 if i == d else 1 for i in range(p.dim())]
        probe = torch.arange(p.shape[d], device=mesh.device_type).view(axis).expand(probe_shape).contiguous()
        local = distribute_tensor(probe, mesh, p.placements, src_data_rank=None).to_local()
        if local.numel() == 0:  # nothing held (some sharded dim is empty here): any index reads nothing
            out[d] = torch.zeros(local.shape[d], dtype=torch.long)
        else:
            out[d] = local.movedim(d, 0).reshape(local.shape[d], -1)[:, 0].cpu()
    return out


def _rows(hf: HFDir, name: str, idx: Optional[torch.Tensor]) -> torch.Tensor:
    """Rows ``idx`` of dim 0 (all when None), reading the covering byte range once."""
    if idx is None:
        return hf.read_rows(name)
    if idx.numel() == 0:
        return hf.read_rows(name, 0, 0)
    lo, hi = int(idx.min()), int(idx.max()) + 1
    t = hf.read_rows(name, lo, hi)
    if idx.numel() == hi - lo and bool((idx == torch.arange(lo, hi)).all()):
        return t
    return t.index_select(0, idx - lo)


def _pick(t: torch.Tensor, dim: int, idx: Optional[torch.Tensor]) -> torch.Tensor:
    return t if idx is None else t.index_select(dim, idx)


class _Importer:
    def __init__(self, hf: HFDir, family: Family):
        self.hf, self.family = hf, family
        self.read_names: Set[str] = set()

    def expected_names(self, src: Source, shape: Tuple[int, ...]) -> List[str]:
        if isinstance(src, (Same, Copies)):
            return [src.name]
        if isinstance(src, Expert):
            if self._fused(src):
                return [f"{src.base}.gate_up_proj" if src.part in ("gate", "up") else f"{src.base}.down_proj"]
            return [f"{src.base}.{e}.{_PROJ[src.part]}.weight" for e in range(shape[0])]
        return []

    def _fused(self, src: Expert) -> bool:
        return self.hf.has(f"{src.base}.gate_up_proj")

    def local(self, our: str, src: Source, shape: Tuple[int, ...], idx: List[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
        """Our tensor ``our`` (global ``shape``) restricted to ``idx``, in fp32 (None: keep as is)."""
        if isinstance(src, Keep):
            return None
        if isinstance(src, Copies):  # every expert = the dense HF matrix, transposed
            if self.hf.shape(src.name) != (shape[2], shape[1]):
                raise CheckpointError(f"{self.hf.path}: {src.name} is {self.hf.shape(src.name)}; upcycling into "
                                      f"our {our} {tuple(shape)} needs {(shape[2], shape[1])} (expert_dim = the "
                                      "dense intermediate_size)")
            one = _pick(_rows(self.hf, src.name, idx[2]).float(), 1, idx[1]).t()
            n = shape[0] if idx[0] is None else idx[0].numel()
            return one.unsqueeze(0).expand(n, *one.shape).contiguous()
        if isinstance(src, Zero):
            return torch.zeros([shape[d] if i is None else i.numel() for d, i in enumerate(idx)])
        if isinstance(src, Same):
            if not self.hf.has(src.name):
                raise CheckpointError(f"{self.hf.path}: no tensor {src.name!r} (our {our})")
            if self.hf.shape(src.name) != tuple(shape):
                raise CheckpointError(f"{self.hf.path}: {src.name} is {self.hf.shape(src.name)}, our {our} is "
                                      f"{tuple(shape)}: does config.json match the model?")
            rows = idx[0]
            if src.rows is not None:  # a row permutation: read the HF rows our rows come from
                perm = torch.tensor(src.rows, dtype=torch.long)
                rows = perm if rows is None else perm[rows]
            t = _rows(self.hf, src.name, rows).float()
            for d in range(1, len(shape)):
                t = _pick(t, d, idx[d])
            return t + src.offset if src.offset else t
        E = shape[0]
        experts = torch.arange(E) if idx[0] is None else idx[0]
        if self._fused(src):
            name = f"{src.base}.gate_up_proj" if src.part in ("gate", "up") else f"{src.base}.down_proj"
            F = shape[2] if src.part != "down" else shape[1]
            if src.part == "down":
                full = _rows(self.hf, name, experts).float()  # [e, D, F] of this rank's experts
            else:  # only this part's half of each of this rank's experts: gate rows first, then up
                lo = 0 if src.part == "gate" else F
                blocks = [self.hf.read_block(name, e, lo, lo + F).float() for e in experts.tolist()]
                full = torch.stack(blocks) if blocks else torch.zeros(0, F, shape[1])
            t = full.transpose(1, 2)  # ours = HF^T per expert
            return _pick(_pick(t, 1, idx[1]), 2, idx[2])
        # Per expert, HF[e] = ours[e]^T: HF rows are our dim 2, HF columns our dim 1.
        out = []
        for e in experts.tolist():
            name = f"{src.base}.{e}.{_PROJ[src.part]}.weight"
            if self.hf.shape(name) != (shape[2], shape[1]):
                raise CheckpointError(f"{self.hf.path}: {name} is {self.hf.shape(name)}, expected "
                                      f"{(shape[2], shape[1])} for our {our}")
            out.append(_pick(_rows(self.hf, name, idx[2]).float(), 1, idx[1]).t())
        return torch.stack(out) if out else torch.zeros([0] + [shape[d] if idx[d] is None else idx[d].numel()
                                                                for d in (1, 2)])


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, path: str, storage_options: Optional[Dict[str, Any]] = None,
                    upcycle: bool = False) -> Dict[str, Any]:
    """Copy the HF weights at ``path`` into ``model``'s (local shards of) parameters and persistent
    buffers. Refuses a tensor of ours without an HF source, an HF tensor nobody reads, a shape
    mismatch. ``upcycle``: ``path`` is a dense model and ``model`` its MoE upcycling (each dense MLP
    copied into every routed expert and the shared expert; routers keep their seeded init).
    Returns a small report (family, tensors)."""
    hf = HFDir(path, storage_options)
    family = for_hf_config(hf.config)
    if upcycle and family.model_type in ("qwen3_moe", "deepseek_v3"):
        refuse_import(f"model.init_from_dense={path} is a {family.hf_class}: upcycling starts from a dense model")
    source = ((lambda n: upcycle_source(family, n, hf.config)) if upcycle
              else (lambda n: family.import_source(n, hf.config)))
    imp = _Importer(hf, family)
    persistent = {_clean(k) for k in model.state_dict().keys()}
    targets = [(n, p) for n, p in model.named_parameters()] + [(n, b) for n, b in model.named_buffers()]
    expected: Set[str] = set()
    n_tensors = 0
    for raw, p in targets:
        name = _clean(raw)
        if name not in persistent:
            continue  # non-persistent statistics buffers
        src = source(name)
        shape = tuple(p.shape)
        expected.update(imp.expected_names(src, shape))
        idx = _local_indices(p)
        local = p.to_local() if hasattr(p, "to_local") else p
        value = imp.local(name, src, shape, idx)
        if value is None:
            continue
        if tuple(value.shape) != tuple(local.shape):
            raise CheckpointError(f"import of {name}: read {tuple(value.shape)} for a local shard of "
                                  f"{tuple(local.shape)}")
        local.copy_(value.to(dtype=local.dtype, device=local.device))
        n_tensors += 1
    tied = bool(getattr(model, "cfg", None) and model.cfg.tie_embeddings)
    unread = set(hf.weight_map) - expected - ({"lm_head.weight"} if tied else set())
    if unread:
        raise CheckpointError(f"{path}: {len(unread)} tensor(s) our model has no place for, e.g. "
                              f"{sorted(unread)[:3]}: does config.json match the model?")
    log.info("initialised %d tensors from %s (%s%s)", n_tensors, path, family.hf_class, ", upcycled" if upcycle else "")
    return {"family": family.model_type, "tensors": n_tensors}


_UPCYCLE = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def upcycle_source(family: Family, name: str, hf: Dict[str, Any]) -> Source:
    """Sparse upcycling (Komatsuzaki et al., 2023): a MoE layer's routed experts and shared expert
    are copies of the dense layer's MLP; its router is new."""
    m = re.fullmatch(r"layers\.(\d+)\.ffn\.experts\.(w1|w2|w3)", name)
    if m:
        return Copies(f"model.layers.{m.group(1)}.mlp.{_UPCYCLE[m.group(2)]}.weight")
    m = re.fullmatch(r"layers\.(\d+)\.ffn\.shared\.(w1|w2|w3)\.weight", name)
    if m:
        return Same(f"model.layers.{m.group(1)}.mlp.{_UPCYCLE[m.group(2)]}.weight")
    if re.fullmatch(r"layers\.\d+\.ffn\.router\.gate\.weight", name):
        return Keep("a new router")
    if re.fullmatch(r"layers\.\d+\.ffn\.router\.expert_bias", name):
        return Zero("a new router")
    return family.import_source(name, hf)
