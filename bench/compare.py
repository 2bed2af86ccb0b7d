"""Our training step against the Hugging Face transformers peer of the same geometry, in one
process, on the same device and batch.

    python -m bench compare --model {llama_1b|dsv3_mini|gemma3_swa_1b} --seq 2048 --batch 4 \\
        [--variants ours,ours_compiled,peer,peer_compiled] [--peer-tf32 on|off] [--split] --out DIR
    python -m bench compare --model dsv3_mini --tiny --out DIR      # CPU: shrunk geometry, fp32

Our step is forward + backward + gradient clipping (1.0) + AdamW step + zero_grad, bf16 autocast
over fp32 master parameters on a GPU (fp32 on CPU), random tokens from a fixed generator, targets
the tokens shifted by one, loss = cross-entropy in fp32 on the logits:

- ``ours``: ``bench.ours.build_ours`` (meta build, ``parallelize``, ``init_weights``,
  ``build_optimizer``, ``train_step``), ``ours_compiled`` with ``compile=True`` (each block, and
  the loss as train_step compiles it); everything train_step does is in the step: the clip folded
  into fused AdamW on CUDA, the MoE sequence aux loss and the expert-bias update;
- ``peer``: ``bench.peer.peer_recipe``, the peer as its users build it (issue 19): fp32 weights
  from ``AutoModelForCausalLM.from_config`` (sdpa attention, ``experts_implementation=
  "grouped_mm"``), bf16 autocast, ``model(input_ids=x, labels=x).loss`` (transformers' own
  shifted, fp32-upcast loss), a plain ``torch.optim.AdamW(fused=True)`` on CUDA, no clipping,
  fp32 matmuls on TF32 (``--peer-tf32 on``, the default; only the MoE peer's fp32 experts have any);
  ``peer_compiled``: ``torch.compile(model)`` on the whole model. DeepseekV3 trains with neither
  aux loss nor bias update. ``peer_layer_compiled`` (diagnostic, not in the default list): the old
  build, each decoder layer compiled on its own, kept to show what that costs.

Each variant: built after ``reset_peak_memory_stats``, one first step (timed apart: it includes
compilation), ``--warmup`` steps, then ``--steps`` steps timed with CUDA events (median, min,
max), one profiled step naming the attention/expert kernels taken; freed before the next. A
variant that fails is recorded as an error entry; the others still run. FLOPs per token come from
``model.flops.flops_per_token`` of our config for both (same geometry, same FLOPs); MFU is against
989 TFLOP/s and against the bf16 matmul rate measured at the start of the run. ``--split`` adds
the time split of our eager step (``bench/split.py``). Writes ``compare_<model>_s<seq>.json`` and
prints a markdown table last.
"""

from __future__ import annotations

import argparse
import gc
import time
import traceback
from typing import Any, Callable, Dict, List

import torch

from bench.common import environment, matmul_peak_tflops, median, time_fn, write_json
from compat.torch_compat import dynamo_reset
from bench.ours import TINY_BATCH, TINY_SEQ, bench_runtime, build_ours, make_batch, model_config
from model.flops import flops_per_token
from devices.runtime import Runtime

VARIANTS = ("ours", "ours_compiled", "peer", "peer_compiled")
DIAGNOSTIC_VARIANTS = ("peer_layer_compiled",)  # run only when named in --variants
DATASHEET_TFLOPS = 989.0  # dense bf16, H100 SXM / H200
# Profiler keys worth naming: which attention and grouped-GEMM kernels (or fallbacks) ran.
# "f32f32"/"tf32" name cuBLAS GEMMs that run in fp32 (an expert path that left bf16).
KERNEL_PATTERNS = ("grouped_mm", "scaled_dot_product", "flash", "efficient_attention", "cudnn_attention",
                   "flex", "f32f32", "tf32", "sgemm")


def _args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench compare")
    ap.add_argument("--model", default="dsv3_mini", help="llama_1b | dsv3_mini | gemma3_swa_1b")
    ap.add_argument("--seq", type=int, default=None, help="default 2048 (64 with --tiny)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step; default 4 (2 with --tiny)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median, min, max)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--split", action="store_true", help="also the time split of our eager step")
    ap.add_argument("--tiny", action="store_true", help="shrunk geometry for a CPU run")
    ap.add_argument("--peer-tf32", choices=("on", "off"), default="on",
                    help="the peer's fp32 matmuls on TF32 tensor cores (on: the issue-19 recipe as "
                         "measured; off: PyTorch's default). Ours has no fp32 matmul; set for peer variants only")
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)
    args.seq = args.seq or (TINY_SEQ if args.tiny else 2048)
    args.batch = args.batch or (TINY_BATCH if args.tiny else 4)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS + DIAGNOSTIC_VARIANTS]
    if bad:
        ap.error(f"--variants: unknown {bad}; choose from {','.join(VARIANTS + DIAGNOSTIC_VARIANTS)}")
    return args


def sync(runtime: Runtime) -> None:
    if runtime.device_type == "cuda":
        torch.cuda.synchronize()


def free_device(runtime: Runtime) -> None:
    gc.collect()
    if runtime.device_type == "cuda":
        torch.cuda.empty_cache()


def kernels_seen(step: Callable[[], Any], runtime: Runtime) -> Dict[str, int]:
    """Calls per step of the profiler keys (ops, and kernels on CUDA) matching KERNEL_PATTERNS."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runtime.device_type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        sync(runtime)
    seen: Dict[str, int] = {}
    for evt in prof.key_averages():
        key = evt.key
        if any(p in key.lower() for p in KERNEL_PATTERNS):
            seen[key[:100]] = seen.get(key[:100], 0) + evt.count
    return dict(sorted(seen.items(), key=lambda kv: -kv[1])[:12])


def peer_step(forward: torch.nn.Module, opt: torch.optim.Optimizer, batch,
              runtime: Runtime) -> Callable[[], torch.Tensor]:
    """The peer's step as its users write it: autocast forward with ``labels=input_ids``,
    backward, fused AdamW step, zero_grad."""
    from bench.peer import peer_loss

    inputs_BT, _ = batch

    def step():
        with runtime.autocast():
            loss = peer_loss(forward, inputs_BT)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def build_variant(variant: str, cfg, runtime: Runtime, batch):
    """(model, step, info) of one variant."""
    from bench.peer import peer_recipe

    compiled = variant.endswith("_compiled")
    if variant.startswith("ours"):
        s = build_ours(cfg, runtime, batch, compile=compiled)
        return s.model, s.step, {}
    r = peer_recipe(cfg, runtime.device, compile=compiled, layer_compile=variant == "peer_layer_compiled")
    return r.model, peer_step(r.forward, r.optimizer, batch, runtime), r.info


def run_variant(variant: str, cfg, runtime: Runtime, batch, steps: int, warmup: int) -> Dict[str, Any]:
    from bench.peer import n_params

    cuda = runtime.device_type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, step, info = build_variant(variant, cfg, runtime, batch)
    sync(runtime)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    step()  # compilation, lazy optimizer state, autotuning: kept out of the timed steps
    sync(runtime)
    first_step_s = time.perf_counter() - t0
    times = time_fn(step, warmup=warmup, iters=steps)
    out = step()
    loss = float(getattr(out, "loss", out))
    kernels = kernels_seen(step, runtime)
    return {
        "variant": variant, "params": n_params(model), "build_s": build_s, "first_step_s": first_step_s,
        "step_s_median": median(times), "step_s_min": min(times), "step_s_max": max(times),
        "step_s_all": times, "loss": loss,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "kernels": kernels, **({"peer": info} if info else {}),
    }


def throughput(r: Dict[str, Any], tokens: int, fpt: float, peak_tflops: float) -> None:
    """tok/s per GPU, TFLOP/s and MFUs from the median step (in place)."""
    tok_s = tokens / r["step_s_median"]
    tflops = tok_s * fpt / 1e12
    r.update(tok_s_per_gpu=tok_s, tflops_per_gpu=tflops, mfu_989=tflops / DATASHEET_TFLOPS,
             mfu_vs_matmul=tflops / peak_tflops if peak_tflops else None)


def param_check(cfg) -> Dict[str, Any]:
    """Parameter counts of ours and the peer, built on the meta device (no memory, no init)."""
    from bench.peer import build_peer, n_params
    from model.transformer import Transformer

    with torch.device("meta"):
        ours = n_params(Transformer(cfg))
    peer = n_params(build_peer(cfg, torch.device("meta"))[0])
    check = {"ours": ours, "peer": peer, "equal": ours == peer}
    if ours != peer:
        check["mismatch"] = f"ours {ours:,} != peer {peer:,} (difference {peer - ours:+,})"
    return check


def ratios(variants: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """ours / peer tokens per second, eager and compiled (None where either side did not run)."""
    def tok(v):
        r = variants.get(v, {})
        return r.get("tok_s_per_gpu")

    out = {}
    for kind, (a, b) in {"eager": ("ours", "peer"), "compiled": ("ours_compiled", "peer_compiled")}.items():
        out[kind] = tok(a) / tok(b) if tok(a) and tok(b) else None
    return out


def table(payload: Dict[str, Any]) -> List[str]:
    lines = ["| variant | step s median | min | max | tok/s/GPU | TFLOP/s | MFU (989) | MFU vs matmul "
             "| peak mem GiB | params | kernels |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in payload["variants"].items():
        if "error" in r or "skipped" in r:
            what = f"ERROR {r['error'][:120]}" if "error" in r else f"skipped: {r['skipped']}"
            lines.append(f"| {name} | {what} | | | | | | | | | |")
            continue
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        mvm = f"{100 * r['mfu_vs_matmul']:.1f}%" if r["mfu_vs_matmul"] else "-"
        # The experts' path first (grouped GEMM or transformers' loop fallback), then attention.
        names = sorted(r["kernels"], key=lambda k: "grouped_mm" not in k)
        kern = ", ".join(k.split("::")[-1][:48] for k in names[:3])
        lines.append(
            f"| {name} | {r['step_s_median']:.4f} | {r['step_s_min']:.4f} | {r['step_s_max']:.4f} | "
            f"{r['tok_s_per_gpu']:,.0f} | {r['tflops_per_gpu']:.1f} | {100 * r['mfu_989']:.1f}% | {mvm} | "
            f"{mem} | {r['params']:,} | {kern} |")
    rt = payload["ratios"]
    fmt = lambda x: f"{x:.2f}x" if x else "n/a"  # noqa: E731
    lines.append("")
    lines.append(f"ours/peer tok/s: eager {fmt(rt['eager'])}, compiled {fmt(rt['compiled'])}")
    return lines


def main(argv=None) -> None:
    args = _args(argv)
    runtime = bench_runtime()
    cfg = model_config(args.model, args.tiny)
    cuda = runtime.device_type == "cuda"
    variants: Dict[str, Dict[str, Any]] = {}
    to_run = []
    for v in args.variants:
        if v.endswith("_compiled") and not cuda:
            variants[v] = {"variant": v, "skipped": "no CUDA device: compile variants run on GPU only"}
        else:
            to_run.append(v)
    params = param_check(cfg)
    print(f"parameters: ours {params['ours']:,}, peer {params['peer']:,}"
          + ("" if params["equal"] else f"  WARNING: MISMATCH {params['mismatch']}"), flush=True)
    peak = matmul_peak_tflops()
    free_device(runtime)
    batch = make_batch(cfg, args.batch, args.seq, runtime.device)
    fpt = flops_per_token(cfg, args.seq)
    tokens = args.batch * args.seq
    from bench.peer import tf32_matmul

    for v in to_run:
        try:
            with tf32_matmul(v.startswith("peer") and args.peer_tf32 == "on"):
                r = run_variant(v, cfg, runtime, batch, args.steps, args.warmup)
            throughput(r, tokens, fpt, peak)
            print({k: x for k, x in r.items() if k not in ("step_s_all", "kernels", "peer")}, flush=True)
        except Exception as e:  # noqa: BLE001 - one failed variant must not lose the others
            r = {"variant": v, "error": f"{type(e).__name__}: {e}",
                 "traceback": traceback.format_exc()[-3000:]}
            print(f"{v}: ERROR {r['error']}\n{r['traceback']}", flush=True)
        variants[v] = r
        if v.endswith("_compiled"):
            dynamo_reset()  # compiled graphs and their guards go with the variant
        free_device(runtime)
    variants = {v: variants[v] for v in args.variants}
    payload: Dict[str, Any] = {
        "model": args.model, "tiny": args.tiny, "seq": args.seq, "batch": args.batch,
        "precision": "bf16 autocast, fp32 master params" if runtime.amp_dtype is not None else "fp32",
        "peer_tf32": args.peer_tf32, "flops_per_token": fpt, "matmul_peak_tflops": peak,
        "datasheet_tflops": DATASHEET_TFLOPS,
        "params": params, "variants": variants, "ratios": ratios(variants), "env": environment(),
    }
    peer_info = next((r["peer"] for r in variants.values() if "peer" in r), None)
    if peer_info:
        payload["peer"] = peer_info
    split_lines: List[str] = []
    if args.split:
        from bench.split import measure_split, split_table

        try:
            payload["split"] = measure_split(cfg, runtime, batch, args.steps, args.warmup)
            split_lines = split_table(payload["split"])
        except Exception as e:  # noqa: BLE001 - the comparison above is still worth writing
            payload["split"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            split_lines = [f"split: ERROR {payload['split']['error']}"]
        free_device(runtime)
    path = write_json(args.out, f"compare_{args.model}_s{args.seq}", payload)
    env = payload["env"]
    print(f"\nwrote {path}")
    tf = peer_info["transformers"] if peer_info else "-"
    print(f"device: {env['device']}, torch {env['torch']}, transformers {tf}, "
          f"{payload['precision']}; {args.model}{' (tiny)' if args.tiny else ''}, seq {args.seq}, "
          f"batch {args.batch}; FLOPs/token {fpt:.3e}; bf16 matmul measured "
          f"{f'{peak:.0f} TFLOP/s' if peak else 'n/a (no GPU)'}")
    if peer_info:
        print(f"peer: {peer_info}")
    if not params["equal"]:
        print(f"WARNING: parameter counts differ: {params['mismatch']}")
    if split_lines:
        print()
        print("\n".join(split_lines))
    print()
    print("\n".join(table(payload)))


if __name__ == "__main__":
    main()
