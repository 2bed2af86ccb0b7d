"""What a checkpoint costs the training loop: step times around each save, through CheckpointManager.

    python -m bench ckpt --model dsv3_mini --modes process:device,thread:device,off --saves 2 --every 100

For each mode: build the model and AdamW state (one warm-up step so the moments exist), then run
real training steps (forward, backward, optimizer step; the manager's ``wait()`` right before each
optimizer step, as the trainer does) and call ``save()`` every ``--every`` steps, then let the
background write finish. Each step is timed to a device sync, the save call included in its step.

The headline figure, **in-loop stall** = median step time of the save steps minus the median
step time of the steps away from any save (the loop without checkpointing); beside it, the same
for the ``--around`` steps after each save (the write running beside training), and per save the
seconds its step and those after it took beyond that median (what the save added to the run). The return time of
``save()`` and the background commit time are **component figures** only: a save can return in
milliseconds and still hold the loop (waiting for staging, queueing behind the previous save,
the writer competing for the GIL), which only the step times show.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import torch

from bench.common import environment, preset, write_json
from model.transformer import Transformer


def _args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench ckpt")
    ap.add_argument("--model", default="dsv3_mini")
    ap.add_argument("--modes", default="process:device,thread:device,off",
                    help="comma-separated async_mode[:staging], e.g. process:device, thread, off")
    ap.add_argument("--saves", type=int, default=2)
    ap.add_argument("--every", type=int, default=100, help="steps between saves")
    ap.add_argument("--around", type=int, default=3, help="steps after each save step reported beside it")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=4, help="checkpoint.write_threads")
    ap.add_argument("--dir", default="", help="checkpoint root (default: a temporary directory)")
    ap.add_argument("--out", default="bench_out")
    return ap.parse_args(argv)


def stall_figures(step_s: list, save_steps: list, around: int) -> dict:
    """Pure: the in-loop cost of saves from per-step times (index = step) and the steps that saved.

    ``stall_s``: median time of the save steps minus the median step away from saves (the extra
    seconds of the step that took the snapshot); ``after_s``: the same for the ``around`` steps
    after each save (the write running beside training); ``extra_s_per_save``: per save, the
    seconds its step and those after it took beyond the median."""
    after = {s + k for s in save_steps for k in range(1, around + 1)}
    base = [t for i, t in enumerate(step_s) if i not in after and i not in set(save_steps)]
    med = statistics.median(base) if base else 0.0
    at = [step_s[s] for s in save_steps if s < len(step_s)]
    aft = [step_s[i] for i in sorted(after) if i < len(step_s)]
    per_save = [sum(max(0.0, step_s[i] - med) for i in range(s, min(len(step_s), s + around + 1)))
                for s in save_steps]
    return {"median_step_s": med,
            "stall_s": (statistics.median(at) - med) if at else 0.0,
            "after_s": (statistics.median(aft) - med) if aft else 0.0,
            "extra_s_per_save": per_save}


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> None:
    from checkpointing.config import CheckpointConfig
    from checkpointing.manager import CheckpointManager
    from checkpointing.state import AppState
    from train.config import OptimConfig
    from train.optim import build_optimizer

    args = _args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = preset(args.model)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.init_weights(0, device=dev)
    opt = build_optimizer(model, OptimConfig(lr=1e-5), dev.type)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    x, y = tokens[:, :-1].to(dev), tokens[:, 1:].to(dev)
    mgr = None

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            logits, aux = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()) + aux
        loss.backward()
        if mgr is not None:
            mgr.wait()  # what the trainer does right before its optimizer step
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    _sync(dev)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    state_bytes += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                       if torch.is_tensor(v))
    results = []
    for spec in args.modes.split(","):
        mode, _, staging = spec.partition(":")
        root = args.dir or tempfile.mkdtemp(prefix="mf_ckpt_")
        ck = CheckpointConfig(root=root, every_steps=args.every, keep_last=1, resume="none", async_mode=mode,
                              staging=staging or "host", write_threads=args.threads)
        mgr = CheckpointManager(ck, root, f"bench_{mode}_{staging or 'host'}")
        mgr.prepare({"app": AppState(model, opt)})  # as the trainer does after its first step
        times, saves, skipped, components = [], [], [], []
        n_steps = args.saves * args.every + args.around + 1
        for i in range(n_steps):
            t0 = time.perf_counter()
            step()
            due = 0 < i <= args.saves * args.every and i % args.every == 0
            if due and mgr.busy():
                skipped.append(i)  # checkpoint.if_busy=skip, as the trainer does: never queue behind a write
            elif due:
                t1 = time.perf_counter()
                res = mgr.save(i, {"app": AppState(model, opt)}, {"tokens": 0}, trainer_state={"step": i})
                components.append({"step": i, "save_return_s": time.perf_counter() - t1,
                                   "snapshot_s": res.snapshot_s})
                saves.append(i)
            _sync(dev)
            times.append(time.perf_counter() - t0)
        t_close = time.perf_counter()
        final = mgr.close()
        tail_s = time.perf_counter() - t_close
        stats = mgr.last_save_stats()
        figs = stall_figures(times, saves, args.around)
        r = {"mode": spec, "saves": saves, "skipped_busy": skipped, **figs, "close_wait_s": tail_s,
             "component": {"per_save": components, "last_commit_s": stats.get("ckpt_commit_s"),
                           "last_write_s": stats.get("ckpt_write_s"), "last_bytes": stats.get("ckpt_bytes")},
             "ok": int(stats.get("ckpt_ok", 0)), "final_committed": bool(final is None or final.committed),
             "step_s": times}
        results.append(r)
        print({k: v for k, v in r.items() if k != "step_s"}, flush=True)
        mgr = None
        shutil.rmtree(root, ignore_errors=True)
    env = environment()
    write_json(args.out, f"ckpt_{args.model}", {"env": env, "state_gb": state_bytes / 1e9, "args": vars(args),
                                                "results": results})
    print(f"\n{env} state {state_bytes / 1e9:.1f} GB, batch {args.batch} x {args.seq}, a save every {args.every} steps")
    print("| mode | median step s | in-loop stall s (save step - median) | steps after a save s (- median) | "
          "extra s per save | component: save() return s | component: write s / commit s (background) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        c = r["component"]
        extra = ", ".join(f"{e:.2f}" for e in r["extra_s_per_save"])
        returns = ", ".join(f"{p['save_return_s']:.2f}" for p in c["per_save"])
        print(f"| {r['mode']} | {r['median_step_s']:.3f} | {r['stall_s']:.3f} | {r['after_s']:.3f} | {extra} | {returns} | "
              f"{c['last_write_s'] or 0:.1f} / {c['last_commit_s'] or 0:.1f} |")


if __name__ == "__main__":
    main()
