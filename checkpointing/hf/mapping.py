"""The one table behind export and import: where each of our tensors lives in a Hugging Face model.

A family (``checkpointing/hf/<family>.py``) maps each of our FQNs to a :class:`Source`:

* :class:`Same`: one HF tensor in our layout, ``ours = hf + offset`` (``offset=1`` for Gemma's
  ``(1 + w)`` norms);
* :class:`Expert`: one slice of the routed experts. Ours are ``w1/w3 [E, D, F]`` and ``w2 [E, F, D]``
  used as ``x @ w``; HF's are ``nn.Linear``-style ``[out, in]``: per expert ``gate_proj/up_proj
  [F, D]`` and ``down_proj [D, F]`` (the Hub layout, which transformers 5 fuses on load), or fused
  ``gate_up_proj [E, 2F, D]`` (gate rows first) and ``down_proj [E, D, F]``;
* :class:`Zero`: a tensor HF has no place for; export requires it to be all zeros (e.g. the
  aux-loss-free selection bias of a softmax-routed Qwen3-MoE), import fills zeros;
* :class:`Copies` / :class:`Keep`: import only, sparse upcycling of a dense model
  (``model.init_from_dense``): the dense MLP copied into every expert; the new router as seeded.

Export turns a full state dict into HF tensors (:func:`to_hf`); import reads, for one local shard of
one of our tensors, exactly the HF rows it needs (``checkpointing/hf/load.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from checkpointing.errors import CheckpointError

EXPERT_LAYOUTS = ("per_expert", "fused")


class ExportRefused(CheckpointError):
    """Our model has something the target HF class cannot express exactly."""


def refuse(msg: str) -> None:
    raise ExportRefused(f"cannot export to Hugging Face: {msg}")


def refuse_import(msg: str) -> None:
    raise CheckpointError(f"cannot import from Hugging Face: {msg}")


@dataclass(frozen=True)
class Same:
    name: str
    offset: float = 0.0
    rows: Optional[Tuple[int, ...]] = None  # import only: our row r is HF row rows[r] (a permutation)


@dataclass(frozen=True)
class Expert:
    base: str  # "model.layers.3.mlp.experts"
    part: str  # "gate" (our w1), "up" (w3), "down" (w2)


@dataclass(frozen=True)
class Zero:
    why: str


@dataclass(frozen=True)
class Copies:
    """Sparse upcycling: every routed expert is a copy of one dense HF matrix ``name`` ([out, in])."""
    name: str


@dataclass(frozen=True)
class Keep:
    """Sparse upcycling: no HF source (the new router); the tensor keeps its seeded init."""
    why: str


Source = Union[Same, Expert, Zero, Copies, Keep]
Rule = Tuple[str, Any]  # (regex over our FQN, replacement string or a Source factory)


def rule_source(name: str, rules: Sequence[Rule]) -> Source:
    """The source of our tensor ``name`` under ``rules`` (first full match wins)."""
    for pattern, repl in rules:
        m = re.fullmatch(pattern, name)
        if m is None:
            continue
        if callable(repl):
            return repl(m)
        if isinstance(repl, tuple):  # (replacement, offset)
            return Same(m.expand(repl[0]), repl[1])
        return Same(m.expand(repl))
    raise CheckpointError(f"no Hugging Face name for our tensor {name!r}")


# Shared by every family: embeddings, head, final norm, dense SwiGLU/GeGLU MLP.
BASE_RULES: List[Rule] = [
    (r"tok_embeddings\.weight", "model.embed_tokens.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"layers\.(\d+)\.ffn\.w1\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"layers\.(\d+)\.ffn\.w3\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"layers\.(\d+)\.ffn\.w2\.weight", r"model.layers.\1.mlp.down_proj.weight"),
]
PRE_NORM_RULES: List[Rule] = [
    (r"layers\.(\d+)\.attention_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
]
GQA_RULES: List[Rule] = [
    (r"layers\.(\d+)\.attention\.wq\.(weight|bias)", r"model.layers.\1.self_attn.q_proj.\2"),
    (r"layers\.(\d+)\.attention\.wk\.(weight|bias)", r"model.layers.\1.self_attn.k_proj.\2"),
    (r"layers\.(\d+)\.attention\.wv\.(weight|bias)", r"model.layers.\1.self_attn.v_proj.\2"),
    (r"layers\.(\d+)\.attention\.wo\.(weight|bias)", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"layers\.(\d+)\.attention\.q_norm\.weight", r"model.layers.\1.self_attn.q_norm.weight"),
    (r"layers\.(\d+)\.attention\.k_norm\.weight", r"model.layers.\1.self_attn.k_norm.weight"),
]
_PARTS = {"w1": "gate", "w3": "up", "w2": "down"}
EXPERT_RULES: List[Rule] = [
    (r"layers\.(\d+)\.ffn\.experts\.(w1|w2|w3)",
     lambda m: Expert(f"model.layers.{m.group(1)}.mlp.experts", _PARTS[m.group(2)])),
]


# -- export: full tensors -------------------------------------------------------------------------
def to_hf(ours: Dict[str, torch.Tensor], sources: Dict[str, Source],
          experts_layout: str = "per_expert") -> Dict[str, torch.Tensor]:
    """Our full state dict -> HF names and layouts (``ours`` keys must all be in ``sources``)."""
    out: Dict[str, torch.Tensor] = {}
    experts: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, t in ours.items():
        src = sources[name]
        if isinstance(src, Zero):
            if bool((t != 0).any()):
                refuse(f"{name} is non-zero (max |x| = {t.abs().max().item():.3g}) and {src.why}")
            continue
        if isinstance(src, Expert):
            experts.setdefault(src.base, {})[src.part] = t
            continue
        out[src.name] = t - src.offset if src.offset else t
    for base, w in experts.items():
        gate_EDF, up_EDF, down_EFD = w["gate"], w["up"], w["down"]
        if experts_layout == "fused":
            out[f"{base}.gate_up_proj"] = torch.cat((gate_EDF.transpose(1, 2), up_EDF.transpose(1, 2)), dim=1)
            out[f"{base}.down_proj"] = down_EFD.transpose(1, 2)
        else:
            for e in range(gate_EDF.shape[0]):
                out[f"{base}.{e}.gate_proj.weight"] = gate_EDF[e].t()
                out[f"{base}.{e}.up_proj.weight"] = up_EDF[e].t()
                out[f"{base}.{e}.down_proj.weight"] = down_EFD[e].t()
    return out


# -- config helpers shared by the families ------------------------------------------------------
def rope_parameters(rope) -> Dict[str, Any]:
    if rope.yarn_factor > 1.0:
        return {"rope_type": "yarn", "rope_theta": float(rope.theta), "factor": float(rope.yarn_factor),
                "original_max_position_embeddings": int(rope.yarn_original_max_position),
                "beta_fast": float(rope.yarn_beta_fast), "beta_slow": float(rope.yarn_beta_slow),
                "mscale": float(rope.yarn_mscale), "mscale_all_dim": float(rope.yarn_mscale_all_dim)}
    return {"rope_type": "default", "rope_theta": float(rope.theta)}


def rope_from_hf(hf: Dict[str, Any], params: Optional[Dict[str, Any]] = None):
    """Our ``RopeConfig`` from HF's ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (4.x). Only default and YaRN RoPE exist in our model."""
    from model.config import RopeConfig

    p = dict(params if params is not None else (hf.get("rope_parameters") or {}))
    if not p:
        p = dict(hf.get("rope_scaling") or {})
        p.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    kind = p.get("rope_type", p.get("type", "default"))
    theta = float(p.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind != "yarn":
        refuse_import(f"rope_type={kind!r}: our RoPE implements 'default' and 'yarn' only")
    return RopeConfig(theta=theta, yarn_factor=float(p["factor"]),
                      yarn_original_max_position=int(p.get("original_max_position_embeddings", 4096)),
                      yarn_beta_fast=float(p.get("beta_fast", 32.0)), yarn_beta_slow=float(p.get("beta_slow", 1.0)),
                      yarn_mscale=float(p.get("mscale", 1.0)), yarn_mscale_all_dim=float(p.get("mscale_all_dim", 0.0)))


def check_act(hf: Dict[str, Any], key: str = "hidden_act", allowed: Tuple[str, ...] = ("silu",)) -> str:
    act = hf.get(key, "silu")
    if act not in allowed:
        refuse_import(f"{key}={act!r}: supported here are {allowed}")
    return act
