"""GPU smoke: bf16 forward/backward of presets, with the grouped-GEMM and FlexAttention paths.

`python -m bench smoke --out DIR` prints a table and writes smoke.json.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import environment, median, preset, time_fn, write_json
from model.attention.kernels import resolve_backend
from model.flops import flops_per_token
from model.transformer import Transformer
from moe.balance import moe_layers

CASES = [("dsv3_mini", 2048, 4), ("gemma3_swa_1b", 2048, 4), ("gemma3_swa_1b", 8192, 1), ("llama_1b", 2048, 4)]


def paths_used(model: Transformer, device: torch.device, seq: int) -> dict:
    """Which kernels the run takes: attention backend per layer kind/window, experts impl."""
    out = {}
    for block in model.layers.values():
        a = block.attention
        if block.kind == "gqa":
            hd = a.head_dim
            q = torch.empty(1, 1, seq, hd, device=device, dtype=torch.bfloat16)
            v = q
        else:
            q = torch.empty(1, 1, seq, a.qk_head_dim, device=device, dtype=torch.bfloat16)
            v = torch.empty(1, 1, seq, a.v_head_dim, device=device, dtype=torch.bfloat16)
        out[f"attention/{block.kind}/w{block.window}"] = resolve_backend("auto", q, v, block.window)
    for name, layer in moe_layers(model):
        out["experts"] = layer.experts.resolve_impl(torch.empty(1, model.cfg.d_model, device=device,
                                                                 dtype=torch.bfloat16))
        break
    return out


def run_case(name: str, seq: int, batch: int, compile_blocks: bool) -> dict:
    cfg = preset(name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device("meta"):
        model = Transformer(cfg)
    model.init_weights(0, device=device)
    if compile_blocks:
        for block in model.layers.values():
            block.compile()
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    inp, tgt = tokens[:, :-1], tokens[:, 1:]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits, aux = model(inp)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tgt.flatten()) + aux
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    loss = step()
    finite = bool(torch.isfinite(loss).item())
    times = time_fn(step, warmup=2, iters=5)
    t = median(times)
    tok_s = batch * seq / t
    fpt = flops_per_token(cfg, seq)
    return {
        "model": name, "seq": seq, "batch": batch, "compiled": compile_blocks, "loss_finite": finite,
        "loss": float(loss.item()), "step_s": t, "tok_s": tok_s, "tflops": tok_s * fpt / 1e12,
        "mfu_989": tok_s * fpt / 989e12,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "paths": paths_used(model, device, seq),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench smoke")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args(argv)
    results = []
    for name, seq, batch in CASES:
        for comp in ([False, True] if args.compile else [False]):
            try:
                r = run_case(name, seq, batch, comp)
            except Exception as e:  # noqa: BLE001 - a smoke reports every case, failed ones too
                r = {"model": name, "seq": seq, "compiled": comp, "error": f"{type(e).__name__}: {e}"}
            results.append(r)
            print(r, flush=True)
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    env = environment()
    write_json(args.out, "smoke", {"env": env, "results": results})
    print(f"\n{env}")
    print("| model | seq | batch | compiled | step s | tok/s | TFLOP/s | MFU(989) | mem GiB | paths |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | {r['seq']} | | {r['compiled']} | ERROR {r['error'][:80]} |")
            continue
        print(f"| {r['model']} | {r['seq']} | {r['batch']} | {r['compiled']} | {r['step_s']:.3f} | "
              f"{r['tok_s']:.0f} | {r['tflops']:.0f} | {100 * r['mfu_989']:.1f}% | "
              f"{r['peak_mem_gib'] or 0:.1f} | {r['paths']} |")


if __name__ == "__main__":
    main()
