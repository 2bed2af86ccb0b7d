"""The decoder-only transformer: embedding, blocks, final norm, output head."""

from __future__ import annotations

import zlib

import torch
from torch import nn

from compat.torch_compat import dtensor_local
from model.attention import kernels
from model.block import TransformerBlock
from model.config import ModelConfig, layer_is_moe, layer_kinds, layer_windows, validate_model_config
from model.norms import RMSNorm
from model.rope import prepare_rope_tables


class Transformer(nn.Module):
    """Built on any device (``meta`` included); ``init_weights(seed)`` gives the same weights for
    the same seed on every device of one type, whatever the construction order or sharding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_model_config(cfg)
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        kinds, windows, moes = layer_kinds(cfg), layer_windows(cfg), layer_is_moe(cfg)
        # A ModuleDict keyed by layer index keeps FQNs stable when parallelism wraps blocks.
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(cfg, i, kinds[i], windows[i], moes[i]) for i in range(cfg.n_layers)}
        )
        self.windows = sorted(set(windows))  # distinct attention windows (0 = full causal)
        self.rope_specs = [block.attention.rope_spec for block in self.layers.values()]
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def output_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def forward_hidden(self, tokens_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-normed hidden states and the summed MoE auxiliary loss."""
        kernels.prepare(tokens_BT.shape[1], self.windows, tokens_BT.device)  # caches, outside compiled blocks
        prepare_rope_tables(self.rope_specs, tokens_BT.shape[1], tokens_BT.device)
        x_BTD = self.tok_embeddings(tokens_BT)
        if self.cfg.embed_scale:  # Gemma: the embedding table is shared with the unscaled head
            x_BTD = x_BTD * (self.cfg.d_model ** 0.5)
        aux = torch.zeros((), device=x_BTD.device, dtype=torch.float32)
        for block in self.layers.values():
            x_BTD, layer_aux = block(x_BTD)
            aux = aux + layer_aux
        return self.norm(x_BTD), aux

    def forward(self, tokens_BT: torch.Tensor, head=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, V] and the summed MoE auxiliary loss (scalar, already weighted).

        ``head(h_BTD, output_weight)``, when given, replaces the output projection: it runs inside
        this forward, where a sharded (FSDP2) model's head weight is gathered (a distillation
        teacher forms its logits chunk by chunk there, never all at once)."""
        h_BTD, aux = self.forward_hidden(tokens_BT)
        if head is not None:
            return head(h_BTD, self.output_weight()), aux
        if self.output is None:
            return nn.functional.linear(h_BTD, self.tok_embeddings.weight), aux
        return self.output(h_BTD), aux

    @torch.no_grad()
    def init_weights(self, seed: int, device: torch.device | str | None = None) -> None:
        """Deterministic init: each tensor draws from a generator seeded by (seed, its name), so the
        result does not depend on module order, and sharded parameters get the slice of the same
        full tensor (``parallelism`` passes DTensors through ``_fill``)."""
        if device is not None and any(p.is_meta for p in self.parameters()):
            self.to_empty(device=device)
        std = self.cfg.init_std
        # Output projections of each residual branch are scaled down with depth (GPT-2 / OLMo).
        out_std = std / (2 * self.cfg.n_layers) ** 0.5
        for name, p in self.named_parameters():
            parts = name.split(".")
            owner = parts[-2] if len(parts) > 1 else ""
            if "norm" in owner:
                _fill(p, lambda shape, g, dev: torch.ones(shape, device=dev))
            elif parts[-1] == "bias":
                _fill(p, lambda shape, g, dev: torch.zeros(shape, device=dev))
            else:
                s = out_std if _is_residual_out(name) else std
                _fill(p, _trunc_normal(s), _name_seed(seed, name))
        for name, b in self.named_buffers():
            b.zero_()


def _name_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def _trunc_normal(std: float):
    def make(shape, g, dev):
        t = torch.empty(shape, dtype=torch.float32, device=dev)
        return nn.init.trunc_normal_(t, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=g)

    return make


def _is_residual_out(name: str) -> bool:
    return (".wo." in name) or name.endswith("ffn.w2.weight") or name.endswith("experts.w2") or (
        ".shared.w2." in name
    )


def _fill(p: torch.Tensor, make, seed: int = 0) -> None:
    """Fill ``p`` with ``make(shape, generator, device)``: the full tensor is drawn on the
    parameter's device type (same values on every rank), and a DTensor keeps its own shard."""
    local = dtensor_local(p)
    dev = (local if local is not None else p).device
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    full = make(tuple(p.shape), g, dev)
    if local is not None:
        from torch.distributed.tensor import distribute_tensor

        # src_data_rank=None: every rank holds the same full tensor, so slice locally, no scatter.
        shard = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
        local.copy_(shard.to_local())
    else:
        p.copy_(full.to(dtype=p.dtype))
