"""Attention kernels side by side: MLA's 192/128 head dims and sliding-window vs full causal.

    python -m bench attn --out DIR [--suite mla,swa] [--reps 20]

MLA (dsv3_mini geometry: 16 heads, qk 192, v 128, seq 2048, batch 4): every way we can run it --
FlexAttention with its default tiles and with tuned tiles, SDPA on v zero-padded to 192 under each
SDPA backend (flash, cuDNN, memory-efficient), SDPA unpadded where a backend takes unequal head
dims -- each checked against an fp32 reference before it is timed.

``cudnn_band`` is cuDNN's kernel through cudnn-frontend's torch op (``attention.backend=cudnn``): the
one that takes a window; it needs ``nvidia-cudnn-frontend`` installed (an ERROR row otherwise).

SWA (gemma3_swa_1b geometry: 4 query heads, 1 kv head, head dim 256, seq 8192, window 1024): a
local layer's attention time (fwd+bwd) over a full causal layer's, against the ideal fraction
2W/S - W^2/S^2.

FLOPs: causal fwd = 2 * B * H * (T(T+1)/2) * (d_qk + d_v) (windowed: the keys actually attended);
fwd+bwd is reported in two conventions: ``x3.5`` (FlashAttention's benchmarks: backward = 2.5 x
forward, what kernel papers quote) and ``x3`` (model.flops / MFU: 3 x forward).
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from bench.common import environment, median, time_fn, write_json
from compat.torch_compat import raise_dynamo_recompile_limits
from model.attention import kernels
from model.flops import mean_context


def _inputs(B, H, h, T, dqk, dv, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, H, T, dqk, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(B, h, T, dqk, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(B, h, T, dv, generator=g).to(device, dtype).requires_grad_()
    return q, k, v


def _sdpa_ctx(backend: Optional[str]):
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend])


def sdpa_padded(backend: Optional[str]) -> Callable:
    """Causal SDPA with v zero-padded to the q/k head dim (the output is sliced back)."""
    def fn(q, k, v, window, scale):
        dv, dqk = v.shape[-1], q.shape[-1]
        vp = F.pad(v, (0, dqk - dv)) if dqk > dv else v
        with _sdpa_ctx(backend):
            o = F.scaled_dot_product_attention(q, k, vp, is_causal=True, scale=scale,
                                               enable_gqa=q.shape[1] != k.shape[1])
        return o[..., :dv]
    return fn


def sdpa_plain(backend: Optional[str]) -> Callable:
    def fn(q, k, v, window, scale):
        with _sdpa_ctx(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                  enable_gqa=q.shape[1] != k.shape[1])
    return fn


def flex_with(options: Optional[dict]) -> Callable:
    def fn(q, k, v, window, scale):
        bm = kernels.flex_block_mask(q.shape[2], window, q.device)
        return kernels._flex_fn(q.device)(q, k, v, block_mask=bm, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
                                          kernel_options=dict(options) if options else None)
    return fn


def varlen_window(q, k, v, window, scale):
    return kernels.attend(q, k, v, window=window, scale=scale, backend="varlen")


def cudnn_band(q, k, v, window, scale):
    return kernels.attend(q, k, v, window=window, scale=scale, backend="cudnn")


def kv_repeated(fn: Callable) -> Callable:
    """``fn`` on k/v copied out to the query heads (GQA/MQA as plain MHA): more parallel work in
    the backward, whose dK/dV tiles otherwise number batch x kv heads x key tiles."""
    def wrapped(q, k, v, window, scale):
        n_rep = q.shape[1] // k.shape[1]
        return fn(q, kernels._repeat_kv(k, n_rep), kernels._repeat_kv(v, n_rep), window, scale)
    return wrapped


def attend_auto(q, k, v, window, scale):
    return kernels.attend(q, k, v, window=window, scale=scale, backend="auto")


FLEX_OPTIONS = {
    "flex_default": None,
    "flex_m128_n64_w8_s3": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    "flex_m64_n64_w4_s3": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    "flex_tma_m128_n64_w8_s3": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "USE_TMA": True},
}


# Head dim 256 (gemma3): tiles that fit 227 KiB of shared memory in forward and backward.
FLEX_OPTIONS_D256 = {
    "flex_default": None,
    "flex_m64_n64_w4_s2": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    "flex_m128_n32_w8_s2": {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
    "flex_m64_n32_w4_s3_bwd32": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3,
                                 "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32},
    "flex_m128_n64_w8_s2_bwd64": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2,
                                  "BLOCK_M1": 64, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 64},
}


def _reference(q, k, v, window, scale):
    n_rep = q.shape[1] // k.shape[1]
    return kernels._eager(q.float(), k.float(), v.float(), window, scale, n_rep)


def _check(fn, q, k, v, window, scale) -> float:
    """Max abs error of fwd output and of dq vs an fp32 eager reference on a slice of the batch."""
    qs, ks, vs = (t[:1].detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(qs, ks, vs, window, scale)
    go = torch.randn_like(out)
    out.backward(go)
    qr, kr, vr = (t[:1].detach().float().clone().requires_grad_() for t in (q, k, v))
    ref = _reference(qr, kr, vr, window, scale)
    ref.backward(go.float())
    return max((out.float() - ref).abs().max().item(), (qs.grad.float() - qr.grad).abs().max().item())


def _time_fwd_bwd(fn, q, k, v, window, scale, reps: int) -> Dict[str, float]:
    go = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[-1], device=q.device, dtype=q.dtype)

    def fwd():
        with torch.no_grad():
            fn(q, k, v, window, scale)

    def fwd_bwd():
        out = fn(q, k, v, window, scale)
        out.backward(go)
        q.grad = k.grad = v.grad = None

    return {"fwd_s": median(time_fn(fwd, warmup=3, iters=reps)),
            "fwd_bwd_s": median(time_fn(fwd_bwd, warmup=3, iters=reps))}


def causal_fwd_flops(B, H, T, dqk, dv, window=0) -> float:
    return 2.0 * B * H * T * mean_context(T, window) * (dqk + dv)


def run_variants(variants: Dict[str, Callable], B, H, h, T, dqk, dv, window, reps, tag) -> List[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = _inputs(B, H, h, T, dqk, dv, device, dtype)
    scale = dqk ** -0.5
    f = causal_fwd_flops(B, H, T, dqk, dv, window)
    rows = []
    for name, fn in variants.items():
        row = {"suite": tag, "variant": name, "B": B, "H": H, "kv_heads": h, "T": T, "d_qk": dqk, "d_v": dv,
               "window": window}
        try:
            row["max_err_vs_fp32"] = _check(fn, q, k, v, window, scale)
            row.update(_time_fwd_bwd(fn, q, k, v, window, scale, reps))
            row["fwd_tflops"] = f / row["fwd_s"] / 1e12
            row["fwd_bwd_tflops_x3.5"] = 3.5 * f / row["fwd_bwd_s"] / 1e12
            row["fwd_bwd_tflops_x3"] = 3.0 * f / row["fwd_bwd_s"] / 1e12
        except Exception as e:  # noqa: BLE001 - a backend that refuses the shape is a result too
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print(row, flush=True)
        rows.append(row)
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return rows


def mla_suite(reps: int, small: bool = False, full_variants: bool = True) -> List[dict]:
    B, H, T = (1, 2, 128) if small else (4, 16, 2048)
    variants: Dict[str, Callable] = {"attend_auto": attend_auto}
    variants.update({name: flex_with(o) for name, o in FLEX_OPTIONS.items() if full_variants or name == "flex_default"})
    for b in ("flash", "cudnn", "efficient", None):
        variants[f"sdpa_pad192_{b or 'any'}"] = sdpa_padded(b)
    for b in ("cudnn", "efficient"):
        variants[f"sdpa_unpadded_{b}"] = sdpa_plain(b)
    variants["cudnn_band"] = cudnn_band
    if not torch.cuda.is_available():
        variants = {k: v for k, v in variants.items() if not k.startswith("flex") and "flash" not in k
                    and "cudnn" not in k}
    return run_variants(variants, B, H, H, T, 192, 128, 0, reps, "mla")


def swa_suite(reps: int, small: bool = False, full_variants: bool = True) -> List[dict]:
    B, H, h, T, D, W = (1, 4, 1, 256, 64, 32) if small else (1, 4, 1, 8192, 256, 1024)
    full = {"full_attend_auto": attend_auto, "full_varlen": varlen_window, "full_sdpa_flash": sdpa_plain("flash"),
            "full_sdpa_cudnn": sdpa_plain("cudnn"), "full_cudnn_band": cudnn_band,
            "full_flex_default": flex_with(None)}
    full["full_cudnn_band_kvrep"] = kv_repeated(cudnn_band)
    local = {"local_attend_auto": attend_auto, "local_cudnn_band": cudnn_band, "local_varlen": varlen_window,
             "local_cudnn_band_kvrep": kv_repeated(cudnn_band),
             "local_flex_m128_n32_w8_s2_kvrep": kv_repeated(flex_with(FLEX_OPTIONS_D256["flex_m128_n32_w8_s2"]))}
    local.update({f"local_{n}": flex_with(o) for n, o in FLEX_OPTIONS_D256.items()
                  if full_variants or n in ("flex_default", "flex_m128_n32_w8_s2")})
    if not torch.cuda.is_available():
        full = {"full_attend_auto": attend_auto}
        local = {"local_attend_auto": attend_auto}
    rows = run_variants(full, B, H, h, T, D, D, 0, reps, "swa_full")
    rows += run_variants(local, B, H, h, T, D, D, W, reps, "swa_local")
    ideal = 2 * W / T - W * W / (T * T)
    full_auto = next((r for r in rows if r["variant"] == "full_attend_auto" and "fwd_bwd_s" in r), None)
    for r in rows:
        if r["suite"] == "swa_local" and "fwd_bwd_s" in r and full_auto:
            r["ratio_to_full_auto"] = r["fwd_bwd_s"] / full_auto["fwd_bwd_s"]
            r["ideal_ratio"] = ideal
            r["ratio_over_ideal"] = r["ratio_to_full_auto"] / ideal
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench attn")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--suite", default="mla,swa")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU test)")
    ap.add_argument("--quick", action="store_true", help="only the default and the best flex tiles")
    args = ap.parse_args(argv)
    # Every variant recompiles flex (new shapes or tile options); past dynamo's default limit of 8
    # it would silently run flex unfused (the math reference) and time that instead.
    raise_dynamo_recompile_limits(256, 4096)
    rows: List[dict] = []
    if "mla" in args.suite:
        rows += mla_suite(args.reps, args.small, not args.quick)
    if "swa" in args.suite:
        rows += swa_suite(args.reps, args.small, not args.quick)
    env = environment()
    write_json(args.out, "attn", {"env": env, "results": rows})
    print(f"\n{env}")
    print("| suite | variant | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s (x3.5) | (x3) | err | local/full (ideal) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['suite']} | {r['variant']} | ERROR {r['error'][:90]} |")
            continue
        ratio = f"{r['ratio_to_full_auto']:.3f} ({r['ideal_ratio']:.3f})" if "ratio_to_full_auto" in r else ""
        print(f"| {r['suite']} | {r['variant']} | {1e3 * r['fwd_s']:.2f} | {1e3 * r['fwd_bwd_s']:.2f} | "
              f"{r['fwd_tflops']:.0f} | {r['fwd_bwd_tflops_x3.5']:.0f} | {r['fwd_bwd_tflops_x3']:.0f} | "
              f"{r['max_err_vs_fp32']:.1e} | {ratio} |")


if __name__ == "__main__":
    main()
