"""Checkpoint stall per save and full commit time, sync vs async, through CheckpointManager.

    python -m bench ckpt --model dsv3_mini --modes off,thread,process,thread:device --saves 3 --out DIR

For each mode: build the model and AdamW state on the GPU (one optimizer step so the moments
exist), then `saves` times: save() (blocked), the wait() the trainer does before its next optimizer
step (staging), and wait_committed() (full commit). Stall = blocked + staging wait: the time the
training step is held up.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from types import SimpleNamespace

import torch

from bench.common import environment, preset, write_json
from model.transformer import Transformer


def main(argv=None) -> None:
    from checkpointing.manager import CheckpointManager
    from checkpointing.state import AppState
    from train.config import OptimConfig
    from train.optim import build_optimizer

    ap = argparse.ArgumentParser(prog="python -m bench ckpt")
    ap.add_argument("--model", default="dsv3_mini")
    ap.add_argument("--modes", default="off,thread,process")
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument("--dir", default="")
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import torch.distributed as dist

    if not dist.is_initialized():  # DCP's process-mode daemon needs a process group, as in training
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    cfg = preset(args.model)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.init_weights(0, device=dev)
    opt = build_optimizer(model, OptimConfig(lr=1e-4), dev.type)
    x = torch.randint(0, cfg.vocab_size, (1, 256), device=dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        logits, aux = model(x)
    (logits.float().mean() + aux).backward()
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    state_bytes += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                       if torch.is_tensor(v))
    results = []
    for spec in args.modes.split(","):
        mode, _, staging = spec.partition(":")  # e.g. thread:device (checkpoint.staging=device)
        root = args.dir or tempfile.mkdtemp(prefix="mf_ckpt_")
        ck = SimpleNamespace(root=root, every_steps=1, keep_last=1, keep_every=0, resume="none", async_mode=mode,
                             staging=staging or "host", save_final=True, storage_options={}, on_save_error="stop",
                             upload_root="")
        mgr = CheckpointManager(ck, root, f"bench_{mode}", process_group=dist.group.WORLD)
        for i in range(1, args.saves + 1):
            torch.cuda.synchronize() if dev.type == "cuda" else None
            t0 = time.perf_counter()
            res = mgr.save(i, {"app": AppState(model, opt)}, {"tokens": 0}, trainer_state={"step": i})
            blocked = time.perf_counter() - t0
            t1 = time.perf_counter()
            mgr.wait()  # what the trainer does right before its next optimizer step
            staging_wait = time.perf_counter() - t1
            final = mgr.wait_committed() or res
            commit = time.perf_counter() - t0
            r = {"mode": spec, "save": i, "blocked_s": blocked, "staging_wait_s": staging_wait,
                 "stall_s": blocked + staging_wait, "commit_s": commit, "bytes": getattr(final, "bytes", -1),
                 "stats": mgr.last_save_stats()}
            results.append(r)
            print(r, flush=True)
        mgr.close()
        shutil.rmtree(root, ignore_errors=True)
    dist.destroy_process_group()
    env = environment()
    write_json(args.out, f"ckpt_{args.model}", {"env": env, "state_gb": state_bytes / 1e9, "results": results})
    print(f"\n{env} state {state_bytes / 1e9:.1f} GB")
    print("| mode | save | stall s (blocked + staging wait) | full commit s |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['save']} | {r['stall_s']:.2f} ({r['blocked_s']:.2f} + {r['staging_wait_s']:.2f}) "
              f"| {r['commit_s']:.1f} |")


if __name__ == "__main__":
    main()
