"""Training-step throughput of a preset through the real trainer pieces (parallelize, train_step,
fused AdamW), on one GPU or under torchrun (FSDP2, expert parallel).

    python -m bench train --model dsv3_mini --seq 2048 --batch 4 [--compile] [--ep 2] \
        [--fp8 tensorwise|rowwise [--fp8-experts off]] [--profile-top 25] --out DIR
    torchrun --nproc-per-node 2 -m bench train --model dsv3_mini --ep 2 --out DIR

Prints tokens/s per GPU, MFU (vs 989 and vs the bf16 matmul rate measured in the same run), peak
memory, and the share of step time in all-to-all and other collectives (from a profiled window).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from bench.common import environment, matmul_peak_tflops, median, preset, time_fn, write_json
from model.flops import flops_per_token
from model.transformer import Transformer


def _args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench train")
    ap.add_argument("--model", default="dsv3_mini")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4, help="sequences per GPU per step")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--ac", action="store_true", help="activation checkpointing")
    ap.add_argument("--ac-policy", default="full", choices=("full", "selective"),
                    help="with --ac: recompute whole blocks, or keep matmul/attention outputs")
    ap.add_argument("--ac-every", type=int, default=1, help="with --ac: checkpoint every N-th block")
    ap.add_argument("--fp8", default="", choices=("", "tensorwise", "rowwise"),
                    help="trainer.precision=fp8 with this recipe (model/fp8.py); needs --compile on SM89+")
    ap.add_argument("--fp8-experts", default="on", choices=("on", "off"), help="with --fp8: trainer.fp8.experts")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--tag", default="")
    ap.add_argument("--profile-top", type=int, default=0, help="print the N ops with the most device time")
    return ap.parse_args(argv)


def _comm_share(prof, step_s_total: float) -> dict:
    """Device time of collective kernels in the profiled window over its wall time."""
    a2a = other = 0.0
    for evt in prof.key_averages():
        name = evt.key.lower()
        t = getattr(evt, "device_time_total", getattr(evt, "cuda_time_total", 0.0)) / 1e6
        if "nccl" not in name and "all_to_all" not in name and "alltoall" not in name:
            continue
        if "alltoall" in name or "all_to_all" in name or "sendrecv" in name:
            a2a += t
        elif "kernel" in name or name.startswith("nccl"):
            other += t
    return {"all_to_all_s": a2a, "other_collectives_s": other,
            "all_to_all_share": a2a / step_s_total if step_s_total else None,
            "other_collectives_share": other / step_s_total if step_s_total else None}


def _top_ops(prof, n: int, window_s: float) -> list:
    """The n kernels/ops with the most self device time in the profiled window (3 steps)."""
    rows = []
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", getattr(evt, "self_cuda_time_total", 0.0)) / 1e6
        if t > 0:
            rows.append({"name": evt.key, "device_ms": 1e3 * t / 3, "calls": evt.count // 3,
                         "share": t / window_s if window_s else 0.0})
    return sorted(rows, key=lambda r: -r["device_ms"])[:n]


def main(argv=None) -> None:
    from parallelism.parallelize import parallelize
    from parallelism.process_group import init_distributed, shutdown
    from devices.runtime import resolve_runtime
    from parallelism.config import ParallelConfig
    from train.optim import build_optimizer
    from train.config import OptimConfig
    from train.step import StepInputs, train_step
    from parallelism.expert_parallel import make_count_reducer

    args = _args(argv)
    runtime = resolve_runtime("auto", "auto", int(os.environ.get("LOCAL_RANK", 0)))
    ctx = init_distributed("auto", 600, runtime.device_type)
    try:
        cfg = preset(args.model)
        with torch.device("meta"):
            model = Transformer(cfg)
        fp8 = None
        if args.fp8:  # the trainer's surgery, before parallelize (train.fsdp_engine.convert_precision)
            from model.fp8 import Fp8Config, convert_to_fp8
            from compat.torch_compat import cuda_capability

            fp8 = convert_to_fp8(model, Fp8Config(recipe=args.fp8, experts=args.fp8_experts == "on"),
                                 capability=cuda_capability(runtime.device) if runtime.device_type == "cuda" else None,
                                 fsdp_float8_all_gather=ctx.world_size > 1)
            if ctx.is_main:
                print(fp8.summary(), flush=True)
        pcfg = ParallelConfig(ep=args.ep)
        parallel = parallelize(model, pcfg, ctx, runtime.device_type,
                               param_dtype=runtime.amp_dtype if ctx.world_size > 1 else None,
                               activation_checkpointing=args.ac, compile=args.compile, ac_policy=args.ac_policy,
                               ac_every=args.ac_every)
        model.init_weights(0, device=runtime.device)
        opt = build_optimizer(model, OptimConfig(lr=3e-4), runtime.device_type)
        reduce = make_count_reducer(parallel.meshes.dp_group) if ctx.distributed else None
        g = torch.Generator(device="cpu").manual_seed(ctx.rank)
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
        batch = (tokens[:, :-1].to(runtime.device), tokens[:, 1:].to(runtime.device))

        def step():
            return train_step(model, opt, StepInputs(iter([batch]), 1), runtime, 1.0, cfg.moe.bias_update_rate, reduce,
                              compiled_loss=parallel.blocks_compiled)

        for _ in range(args.warmup):
            step()
        times = [time_fn(step, warmup=0, iters=1)[0] for _ in range(args.steps)]
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runtime.device_type == "cuda" else [])
        with profile(activities=activities) as prof:
            window_s = sum(time_fn(step, warmup=0, iters=3))
        comm = _comm_share(prof, window_s)
        top = _top_ops(prof, args.profile_top, window_s) if args.profile_top else []
        busy = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages()) / 1e6
        t = median(times)
        tok_s_gpu = args.batch * args.seq / t
        fpt = flops_per_token(cfg, args.seq)
        peak = matmul_peak_tflops() if ctx.rank == 0 else 0.0
        result = {
            "model": args.model, "seq": args.seq, "batch_per_gpu": args.batch, "world_size": ctx.world_size,
            "ep": args.ep, "compiled": args.compile, "ac": args.ac, "fp8": fp8.summary() if fp8 else None,
            "ac_policy": args.ac_policy if args.ac else None, "ac_every": args.ac_every if args.ac else None, "step_s_median": t, "step_s_all": times,
            "tok_s_per_gpu": tok_s_gpu, "tflops_per_gpu": tok_s_gpu * fpt / 1e12,
            "mfu_989": tok_s_gpu * fpt / 989e12, "matmul_peak_tflops": peak,
            "mfu_vs_matmul": tok_s_gpu * fpt / (peak * 1e12) if peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None, **comm, "device_busy_share": busy / window_s if window_s else None, "top_ops": top, "env": environment(),
        }
        if ctx.rank == 0:
            fp8_tag = f"_fp8{args.fp8}" + ("" if args.fp8_experts == "on" else "_dense") if args.fp8 else ""
            name = f"train_{args.model}_w{ctx.world_size}_ep{args.ep}{'_c' if args.compile else ''}{fp8_tag}{args.tag}"
            write_json(args.out, name, result)
            print({k: v for k, v in result.items() if k not in ("step_s_all", "env", "top_ops")}, flush=True)
            for row in top:
                print(f"  {row['share']:6.1%} {row['device_ms']:9.2f} ms {row['calls']:6d}x  {row['name'][:110]}")
    finally:
        if dist.is_initialized():
            dist.barrier()
        shutdown()


if __name__ == "__main__":
    main()
