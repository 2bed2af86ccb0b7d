"""Where our (eager) training step's time goes: each piece timed alone, forward + backward, on the
inputs it sees inside the real step, times the number of layers of its kind, against the full step.

    python -m bench split --model dsv3_mini --seq 2048 --batch 4 --out DIR   # or --tiny on a CPU
    python -m bench compare ... --split                                       # same, in compare's JSON

Components:

- ``attention``: one layer's attention module per (kind, window) -- e.g. gemma3's local and
  global layers apart -- times the layers of that kind;
- ``experts``: the routed experts (grouped GEMM) on the rows and counts the first MoE layer's
  experts received in the real forward of the benchmark batch (the router's actual routing);
- ``router_dispatch``: the MoE layer's own forward with the experts swapped for an identity and
  the shared experts off: routing (gate, scores, top-k, aux loss), the sort/gather of dispatch,
  the weighted scatter of combine, the routing counters;
- ``shared_or_dense_mlp``: the MoE layers' shared experts and the dense layers' SwiGLU;
- ``norms_embed_loss``: every block's RMSNorms and the final one, the embedding, and the output
  head with the fp32 cross-entropy;
- ``optimizer``: gradient clipping, the AdamW step and the expert-bias update, on real gradients.

Inputs are captured with forward pre-hooks during one forward of the real model on the batch (so
dtypes are the step's: fp32 residual stream, bf16 projections under autocast). Each timed call
sets the gradients it made back to None, as the step's zero_grad does. Timing goes in rounds:
one full step, then each piece once, ``--warmup`` rounds then ``--steps`` timed rounds; medians
(CUDA events on a GPU; process CPU time on a CPU, where only the tests run it). What timing a
piece alone adds -- its own backward call and gradient reset, measured on an empty piece in the
same rounds (``harness_overhead_s``) -- is taken off each piece's per-call time.
What is left of the full step (residual adds, autograd and launch overhead between pieces) is the
remainder.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from bench.common import environment, median, time_fn, write_json
from bench.ours import GRAD_CLIP, TINY_BATCH, TINY_SEQ, bench_runtime, build_ours, make_batch, model_config
from model.config import ModelConfig
from devices.runtime import Runtime

COMPONENTS = ("attention", "experts", "router_dispatch", "shared_or_dense_mlp", "norms_embed_loss", "optimizer")


def fwd_bwd_runner(fn: Callable[..., Any], inputs: Sequence[torch.Tensor], modules: Sequence[torch.nn.Module],
                   runtime: Runtime) -> Callable[[], None]:
    """A call of ``fn(*inputs)`` forward + backward under the step's autocast, with fixed random
    output gradients; the gradients it leaves are reset to None (as the step's zero_grad does)."""
    def outputs():
        with runtime.autocast():
            out = fn(*inputs)
        return [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]

    grads = [torch.randn_like(o) for o in outputs()]

    def run():
        torch.autograd.backward(outputs(), grads)
        for m in modules:
            m.zero_grad(set_to_none=True)
        for x in inputs:
            x.grad = None

    return run


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(x.is_floating_point())


class _Capture:
    """Positional inputs of chosen modules (and outputs of others) during one forward."""

    def __init__(self, inputs: Dict[str, torch.nn.Module], outputs: Dict[str, torch.nn.Module]):
        self.seen: Dict[str, Any] = {}
        self.handles = [m.register_forward_pre_hook(self._pre(k)) for k, m in inputs.items()]
        self.handles += [m.register_forward_hook(self._post(k)) for k, m in outputs.items()]

    def _pre(self, key):
        def hook(module, args):
            self.seen.setdefault(key, tuple(a.detach().clone() for a in args))
        return hook

    def _post(self, key):
        def hook(module, args, out):
            self.seen.setdefault(key, (out.detach().clone(),))
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


class _NoExperts(torch.nn.Module):
    """Stands in for the routed experts: hands the dispatched rows back unchanged."""

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        return x_ND


def without_experts(layer) -> Callable[[torch.Tensor], Any]:
    """``layer``'s own forward with identity experts and no shared experts: the routing (gate,
    scores, top-k, aux loss), the dispatch gather, the weighted combine and the routing counters,
    as the layer runs them, and nothing else."""
    def run(x_BTD):
        experts, shared = layer.experts, layer.shared
        layer.experts, layer.shared = _NoExperts(), None
        try:
            return layer(x_BTD)
        finally:
            layer.experts, layer.shared = experts, shared

    return run


@dataclass
class _Piece:
    component: str
    what: str
    layers: int
    run: Callable[[], None]
    before: Optional[Callable[[], None]] = None  # untimed set-up of each call
    after: Optional[Callable[[], None]] = None
    times: List[float] = field(default_factory=list)


def _time_once(fn: Callable[[], Any]) -> float:
    """Seconds of one call: CUDA events on a GPU (bench.common.time_fn); on a CPU the process's
    CPU time, which a busy shared machine does not inflate the way it does the wall clock (the
    CPU path exists for tests; its numbers are not performance figures)."""
    if torch.cuda.is_available():
        return time_fn(fn, warmup=0, iters=1)[0]
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def _timed_rounds(full_step: Callable[[], Any], pieces: List[_Piece], warmup: int, iters: int) -> List[float]:
    """Rounds of one full step then each piece once: a drift of the machine (clocks, a
    neighbour's load) falls on the step and on the pieces alike. Returns the full-step times."""
    full: List[float] = []
    for r in range(warmup + iters):
        t = _time_once(full_step)
        if r >= warmup:
            full.append(t)
        for p in pieces:
            if p.before is not None:
                p.before()
            t = _time_once(p.run)
            if p.after is not None:
                p.after()
            if r >= warmup:
                p.times.append(t)
    return full


def _pieces(model, opt, cfg: ModelConfig, runtime: Runtime, batch, compiled: bool = False) -> List[_Piece]:
    from moe.balance import update_expert_bias
    from parallelism.parallelize import clip_grad_norm, grad_norm
    from train.optim import can_fold_clip, fold_clip, unfold_clip
    from train.step import lm_loss

    inputs_BT, targets_BT = batch
    blocks = list(model.layers.values())
    # One block per attention (kind, window) and per FFN kind; every block has the same norms.
    attn_groups: Dict[tuple, List[int]] = {}
    for i, b in enumerate(blocks):
        attn_groups.setdefault((b.kind, b.window), []).append(i)
    dense = [i for i, b in enumerate(blocks) if not b.is_moe]
    moe = [i for i, b in enumerate(blocks) if b.is_moe]
    watch = {f"attn{i[0]}": blocks[i[0]].attention for i in attn_groups.values()}
    norm_names = [n for n, _ in blocks[0].named_children() if n.endswith("norm")]
    watch.update({f"norm.{n}": getattr(blocks[0], n) for n in norm_names})
    if dense:
        watch["dense"] = blocks[dense[0]].ffn
    if moe:
        watch["moe"] = blocks[moe[0]].ffn
        watch["experts"] = blocks[moe[0]].ffn.experts  # the rows and counts routing produced
    watch["final_norm_in"] = model.norm
    cap = _Capture(watch, {"final_norm_out": model.norm})
    model.train()
    with torch.no_grad(), runtime.autocast():
        model(inputs_BT)
    cap.close()
    seen = {k: v[0] for k, v in cap.seen.items()}

    def piece(component, what, layers, fn, xs, mods):
        return _Piece(component, what, layers, fwd_bwd_runner(fn, xs, mods, runtime))

    out = []
    for (kind, window), ids in attn_groups.items():
        a = blocks[ids[0]].attention
        out.append(piece("attention", f"{kind} window {window or 'full'} (layer {ids[0]})", len(ids), a,
                         [_leaf(seen[f"attn{ids[0]}"])], [a]))
    if moe:
        layer = blocks[moe[0]].ffn
        x_BTD = _leaf(seen["moe"])
        out.append(piece("router_dispatch", f"router + dispatch + combine (layer {moe[0]})", len(moe),
                         without_experts(layer), [x_BTD], [layer]))
        x_ND, counts_E = cap.seen["experts"]
        out.append(piece("experts", f"routed experts, {int(counts_E.sum())} of {x_ND.shape[0]} rows routed "
                         f"(layer {moe[0]})", len(moe), lambda x: layer.experts(x, counts_E), [_leaf(x_ND)],
                         [layer.experts]))
        if layer.shared is not None:
            out.append(piece("shared_or_dense_mlp", f"shared experts (layer {moe[0]})", len(moe),
                             lambda x: layer.shared(x.reshape(-1, x.shape[-1])), [x_BTD], [layer.shared]))
    if dense:
        ffn = blocks[dense[0]].ffn
        out.append(piece("shared_or_dense_mlp", f"dense SwiGLU (layer {dense[0]})", len(dense), ffn,
                         [_leaf(seen["dense"])], [ffn]))
    for n in norm_names:
        norm = getattr(blocks[0], n)
        out.append(piece("norms_embed_loss", n, len(blocks), norm, [_leaf(seen[f"norm.{n}"])], [norm]))
    out.append(piece("norms_embed_loss", "final norm", 1, model.norm, [_leaf(seen["final_norm_in"])],
                     [model.norm]))
    emb = model.tok_embeddings
    out.append(piece("norms_embed_loss", "embedding", 1, lambda: emb(inputs_BT), [], [emb]))
    head = model.output if model.output is not None else model.tok_embeddings
    out.append(piece("norms_embed_loss", "output head + cross-entropy", 1,
                     lambda h: lm_loss(F.linear(h, model.output_weight()), targets_BT, compiled),
                     [_leaf(seen["final_norm_out"])], [head]))

    # The optimizer runs on the gradients of one real forward/backward, put back before each call
    # (the full step in between sets them to None) and taken away after it.
    with runtime.autocast():
        logits_BTV, aux = model(inputs_BT)
    (lm_loss(logits_BTV, targets_BT) + aux).backward()
    grads = {p: p.grad for p in model.parameters() if p.grad is not None}
    opt.zero_grad(set_to_none=True)

    def put_grads():
        for p, g in grads.items():
            p.grad = g

    def opt_step():
        # train_step's clip: folded into fused AdamW where it can be, else a foreach pass.
        params = list(grads)
        if can_fold_clip(opt, params):
            fold_clip(opt, grad_norm(params), GRAD_CLIP)
        else:
            clip_grad_norm(params, GRAD_CLIP)
        try:
            opt.step()
        finally:
            unfold_clip(opt)
        update_expert_bias(model, cfg.moe.bias_update_rate)

    out.append(_Piece("optimizer", "clip + AdamW step + expert-bias update", 1, opt_step, before=put_grads,
                      after=lambda: opt.zero_grad(set_to_none=True)))
    return out


def measure_split(cfg: ModelConfig, runtime: Runtime, batch, steps: int = 10, warmup: int = 3) -> Dict[str, Any]:
    s = build_ours(cfg, runtime, batch, compile=False)
    for _ in range(warmup):
        s.step()
    pieces = _pieces(s.model, s.optimizer, cfg, runtime, batch, s.compiled)
    # What timing a piece alone adds (a backward call of its own, the gradient reset), measured on
    # an empty piece the same way and taken off each piece: inside the step it is paid once.
    x = torch.zeros(8, device=runtime.device, requires_grad=True)
    empty = _Piece("harness", "empty forward + backward", 1, fwd_bwd_runner(lambda t: t * 1.0, [x], [], runtime))
    full = _timed_rounds(s.step, pieces + [empty], warmup, steps)
    full_s, overhead = median(full), median(empty.times)
    components = {}
    for c in COMPONENTS:
        parts = [{"what": p.what, "layers": p.layers, "per_layer_s": max(0.0, median(p.times) - overhead),
                  "seconds": max(0.0, median(p.times) - overhead) * p.layers, "per_layer_s_all": p.times}
                 for p in pieces if p.component == c]
        secs = sum(p["seconds"] for p in parts)
        components[c] = {"seconds": secs, "share": secs / full_s, "parts": parts}
    total = sum(c["seconds"] for c in components.values())
    inputs_BT = batch[0]
    return {"model": cfg.name, "seq": inputs_BT.shape[1], "batch": inputs_BT.shape[0], "compiled": False,
            "full_step_s": full_s, "full_step_s_all": full, "components": components,
            "harness_overhead_s": overhead,
            "sum_s": total, "remainder_s": full_s - total, "remainder_share": (full_s - total) / full_s}


def split_table(split: Dict[str, Any]) -> List[str]:
    lines = [f"Time split of our eager step ({split['model']}, seq {split['seq']}, batch {split['batch']}):",
             "| component | seconds | share of step | parts |", "|---|---|---|---|"]
    for name, c in split["components"].items():
        what = "; ".join(f"{p['what']} x{p['layers']}" for p in c["parts"]) or "-"
        lines.append(f"| {name} | {c['seconds']:.4f} | {100 * c['share']:.1f}% | {what} |")
    lines.append(f"| unattributed | {split['remainder_s']:.4f} | {100 * split['remainder_share']:.1f}% | "
                 "residual adds, autograd and launch gaps |")
    lines.append(f"| full step (measured) | {split['full_step_s']:.4f} | 100% | |")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench split")
    ap.add_argument("--model", default="dsv3_mini")
    ap.add_argument("--seq", type=int, default=None, help="default 2048 (64 with --tiny)")
    ap.add_argument("--batch", type=int, default=None, help="default 4 (2 with --tiny)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)
    seq = args.seq or (TINY_SEQ if args.tiny else 2048)
    batch_size = args.batch or (TINY_BATCH if args.tiny else 4)
    runtime = bench_runtime()
    cfg = model_config(args.model, args.tiny)
    split = measure_split(cfg, runtime, make_batch(cfg, batch_size, seq, runtime.device), args.steps, args.warmup)
    split.update(model=args.model, tiny=args.tiny, env=environment())
    path = write_json(args.out, f"split_{args.model}_s{seq}", split)
    print(f"wrote {path}\ndevice: {split['env']['device']}, torch {split['env']['torch']}")
    print("\n".join(split_table(split)))


if __name__ == "__main__":
    main()
