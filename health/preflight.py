"""Preflight: is this node fit to train? Measure (impure), then judge against floors (pure).

Checks: GPU count vs expected; NVML sanity (ECC, row remap, XIDs via the health policy); a bf16
matmul burn-in checked for correctness against an fp64 reference and for TFLOP/s against a floor per
device kind; run-to-run bitwise consistency of that matmul (deep mode: a longer burn); device memory
copy bandwidth vs a floor; all-reduce bus bandwidth across every rank (when a process group or a
torchrun environment exists) vs a floor per instance type; EFA devices on EFA instance types.

On CPU it runs matmul correctness in fp32 and bf16, reports GPU checks as skipped, and passes.
Exit ``ExitCode.UNHEALTHY`` names the bad hosts and GPUs; exit 0 when healthy (``python -m health preflight``).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field

log = logging.getLogger("moeforge.health")

OK, FAIL, SKIP, WARN = "ok", "fail", "skip", "warn"

# Floors per device kind (a substring of torch.cuda.get_device_name). Matmul: dense bf16 8192^3
# (an H100 measured 788 TFLOP/s, datasheet 989; H200 has the same SMs). Copy: read+write bytes of a
# device-to-device copy, ~80% of measured (H100 ~3.0 TB/s, H200 ~4.3 TB/s; reference/FACTS.md).
# Device kinds not listed are measured and reported, never failed.
DEVICE_FLOORS: dict[str, dict[str, float]] = {
    "H200": {"matmul_tflops": 600.0, "copy_gbps": 3400.0},
    "H100": {"matmul_tflops": 600.0, "copy_gbps": 2400.0},
}

# All-reduce bus bandwidth floors (GB/s, nccl-tests busbw definition) per instance type: AWS's
# conservative figure for p5/p5e/p5en. Other types: reported only.
ALLREDUCE_FLOORS_GBPS: dict[str, float] = {
    "p5.48xlarge": 800.0,
    "p5e.48xlarge": 800.0,
    "p5en.48xlarge": 800.0,
}

# EFA interfaces per instance (AWS instance specs). Zero present on these types fails; fewer than
# listed warns (a count that changes with a new generation should not take a node out).
EFA_EXPECTED: dict[str, int] = {
    "p4d.24xlarge": 4, "p4de.24xlarge": 4,
    "p5.48xlarge": 32, "p5e.48xlarge": 32, "p5en.48xlarge": 16,
    "trn1.32xlarge": 8, "trn1n.32xlarge": 16, "trn2.48xlarge": 16,
}

# Max relative Frobenius error of a matmul vs the fp64 product of the same (rounded) inputs: output
# rounding dominates (bf16 unit roundoff 2^-8 -> ~2e-3 in norm); a broken unit is far above.
REL_ERR_MAX = {"bfloat16": 1e-2, "float16": 2e-3, "float32": 1e-4}


@dataclass
class Check:
    name: str
    status: str  # ok | fail | skip | warn
    value: float | None = None
    floor: float | None = None
    unit: str = ""
    detail: str = ""
    gpu: int | None = None
    rank: int = 0
    host: str = ""
    op: str = ">="  # how value compares with floor: >=, <=, ==

    def row(self) -> str:
        val = "" if self.value is None else f"{self.value:.4g}"
        flo = "" if self.floor is None else f"{self.op} {self.floor:g}"
        gpu = "-" if self.gpu is None else str(self.gpu)
        return (f"{self.rank:>4} {self.host[:24]:<24} {gpu:>3} {self.name:<22} {self.status:<4} "
                f"{val:>10} {self.unit:<7} {flo:<12} {self.detail}")


@dataclass
class GpuMeasurement:
    gpu: int
    name: str = ""
    matmul_tflops: float | None = None
    matmul_rel_err: float | None = None
    matmul_dtype: str = "bfloat16"
    matmul_mismatches: int | None = None  # deep burn: iterations whose result differed bitwise
    matmul_iters: int = 0
    copy_gbps: float | None = None


@dataclass
class Measurements:
    """What preflight measured on one rank; ``judge`` turns it into checks (pure, unit-tested)."""
    host: str = ""
    rank: int = 0
    world_size: int = 1
    device_type: str = "cpu"
    gpu_count: int = 0
    gpus: list[GpuMeasurement] = field(default_factory=list)
    cpu_matmul: list[GpuMeasurement] = field(default_factory=list)  # gpu=-1: CPU correctness runs
    nvml: str = "skip"  # "ok", or why it was skipped
    nvml_findings: list[dict] = field(default_factory=list)  # policy findings with an exit action
    allreduce_busbw_gbps: float | None = None
    allreduce_bytes: int = 0
    efa_devices: list[str] | None = None  # None: not looked at


def device_floors(name: str, overrides: dict | None = None) -> dict[str, float]:
    floors: dict[str, float] = {}
    for kind, f in DEVICE_FLOORS.items():
        if kind in name:
            floors = dict(f)
            break
    floors.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return floors


def judge(m: Measurements, expected_gpus: int = 0, instance_type: str = "",
          floor_overrides: dict | None = None) -> list[Check]:
    """Checks for one rank's measurements. Pure: floors come from the tables plus ``floor_overrides``
    (keys matmul_tflops, copy_gbps, allreduce_gbps)."""
    ov = floor_overrides or {}
    out: list[Check] = []

    def add(**kw):
        out.append(Check(rank=m.rank, host=m.host, **kw))

    if m.device_type != "cuda":
        add(name="gpu_count", status=FAIL if expected_gpus else SKIP, value=m.gpu_count,
            floor=expected_gpus or None, op="==", detail="no CUDA device" + (f" (expected {expected_gpus})" if expected_gpus else ""))
    else:
        bad = expected_gpus and m.gpu_count != expected_gpus
        add(name="gpu_count", status=FAIL if bad else OK, value=m.gpu_count, floor=expected_gpus or None, op="==",
            detail=f"expected {expected_gpus}" if expected_gpus else "no expectation set")
    for c in m.cpu_matmul:
        lim = REL_ERR_MAX.get(c.matmul_dtype, 1e-2)
        ok = c.matmul_rel_err is not None and c.matmul_rel_err <= lim
        add(name="cpu_matmul_rel_err", status=OK if ok else FAIL, value=c.matmul_rel_err, floor=lim, op="<=",
            detail=f"{c.matmul_dtype} vs fp64 ({c.matmul_tflops or 0:.3g} TFLOP/s)")
    if m.nvml == "ok":
        if not m.nvml_findings:
            add(name="nvml", status=OK, value=0, detail="no ECC, row-remap or XID findings")
        for f in m.nvml_findings:
            add(name="nvml", status=FAIL, gpu=f["gpu"], detail=f"{f['what']}={f['raw_value']} -> {f['action']}")
    else:
        add(name="nvml", status=SKIP, detail="no CUDA device" if m.device_type != "cuda" else m.nvml)
    if m.device_type != "cuda":
        for name in ("matmul_tflops", "copy_gbps"):
            add(name=name, status=SKIP, detail="no CUDA device")
    for g in m.gpus:
        fl = device_floors(g.name, {k: ov.get(k) for k in ("matmul_tflops", "copy_gbps")})
        lim = REL_ERR_MAX.get(g.matmul_dtype, 1e-2)
        if g.matmul_rel_err is not None:
            add(name="matmul_rel_err", status=OK if g.matmul_rel_err <= lim else FAIL, value=g.matmul_rel_err,
                floor=lim, op="<=", gpu=g.gpu, detail=f"{g.matmul_dtype} vs fp64, {g.name}")
        if g.matmul_mismatches is not None:
            add(name="matmul_consistency", status=FAIL if g.matmul_mismatches else OK,
                value=g.matmul_mismatches, gpu=g.gpu,
                detail=f"{g.matmul_mismatches} of {g.matmul_iters} repeats differed bitwise from the first")
        for key, unit in (("matmul_tflops", "TFLOP/s"), ("copy_gbps", "GB/s")):
            v, f = getattr(g, key), fl.get(key)
            if v is None:
                add(name=key, status=SKIP, gpu=g.gpu, detail="not measured")
            elif f is None:
                add(name=key, status=OK, value=v, unit=unit, gpu=g.gpu, detail=f"no floor for {g.name!r}")
            else:
                add(name=key, status=OK if v >= f else FAIL, value=v, floor=f, unit=unit, gpu=g.gpu, detail=g.name)
    if m.allreduce_busbw_gbps is None:
        add(name="allreduce_busbw", status=SKIP, detail="single process (no process group)")
    else:
        f = ov.get("allreduce_gbps") or (ALLREDUCE_FLOORS_GBPS.get(instance_type) if m.device_type == "cuda" else None)
        detail = f"{m.world_size} ranks, {m.allreduce_bytes / 2**20:.0f} MiB"
        add(name="allreduce_busbw", status=OK if f is None or m.allreduce_busbw_gbps >= f else FAIL,
            value=m.allreduce_busbw_gbps, floor=f, unit="GB/s",
            detail=detail + ("" if f is not None else f"; no floor for {instance_type or 'this instance'}"))
    want = EFA_EXPECTED.get(instance_type)
    if want is None:
        add(name="efa", status=SKIP, detail=f"{instance_type or 'unknown instance type'} has no EFA expectation")
    else:
        n = len(m.efa_devices or [])
        status = FAIL if n == 0 else WARN if n < want else OK
        add(name="efa", status=status, value=n, floor=want, detail=f"{instance_type}: /sys/class/infiniband")
    return out


# ---------------------------------------------------------------------- measuring
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_check(device, dtype, n: int, iters: int, burn_s: float = 0.0) -> GpuMeasurement:
    """rel error vs fp64, TFLOP/s over ``iters`` timed matmuls, and (``burn_s`` > 0) a burn-in that
    counts results differing bitwise from the first (same inputs, same kernel: must be identical)."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    for _ in range(2):  # warm-up: cuBLAS picks its kernel; every later call must match this one
        c = a @ b
    ref = a.double() @ b.double()
    rel = float((c.double() - ref).norm() / ref.norm())
    del ref
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    dt = time.perf_counter() - t0
    m = GpuMeasurement(gpu=device.index if device.type == "cuda" else -1, matmul_rel_err=rel,
                       matmul_tflops=2 * n**3 * iters / dt / 1e12, matmul_dtype=str(dtype).replace("torch.", ""))
    if burn_s > 0:
        # The count stays on the device (no sync per matmul), so the GPU is kept busy: a burn-in.
        bad = torch.zeros((), dtype=torch.int64, device=device)
        k, t_end = 0, time.perf_counter() + burn_s
        while time.perf_counter() < t_end and k < 100_000:
            for _ in range(10):
                bad += (a @ b).ne(c).any()
                k += 1
            _sync(device)
        m.matmul_mismatches, m.matmul_iters = int(bad.item()), k
    return m


def copy_bandwidth_gbps(device, nbytes: int, iters: int) -> float:
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    _sync(device)
    return 2 * src.numel() * 4 * iters / (time.perf_counter() - t0) / 1e9  # read + write


def allreduce_busbw_gbps(device, nbytes: int, iters: int, group=None) -> float:
    """nccl-tests' busbw: algbw * 2(n-1)/n, algbw = bytes / time per all-reduce."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size(group)
    x = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)  # zeros: repeated sums never overflow
    for _ in range(2):
        dist.all_reduce(x, group=group)
    _sync(device)
    dist.barrier(group=group)
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x, group=group)
    _sync(device)
    dt = (time.perf_counter() - t0) / iters
    return x.numel() * 4 / dt / 1e9 * 2 * (world - 1) / world


def efa_devices(sysfs: str = "/sys/class/infiniband") -> list[str]:
    try:
        return sorted(os.listdir(sysfs))
    except OSError:
        return []


def _nvml_findings(host: str) -> tuple[str, list[dict]]:
    from health.nvml import open_probe
    from health.policy import EXIT_76, evaluate, evaluate_xid

    probe = open_probe()
    if probe is None:
        return "unavailable (no driver or nvidia-ml-py)", []
    try:
        bad = []
        for i in range(probe.device_count()):
            bad += [f for f in evaluate(probe.read(i), None, None, host) if f.action == EXIT_76]
        bad += [f for f in (evaluate_xid(g, x, host) for g, x in probe.xid_events(0)) if f.action == EXIT_76]
        return "ok", [asdict(f) for f in bad]
    finally:
        probe.close()


def measure(deep: bool = False) -> Measurements:
    """Run this rank's measurements. Under a process group each rank tests its own GPU
    (cuda:LOCAL_RANK) and local rank 0 reads NVML for the node; a single process tests every
    visible GPU in turn. The all-reduce runs on the default group (NCCL on GPU)."""
    import torch
    import torch.distributed as dist

    host = socket.gethostname()
    dist_on = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if dist_on else 0
    world = dist.get_world_size() if dist_on else 1
    m = Measurements(host=host, rank=rank, world_size=world)
    if torch.cuda.is_available():
        m.device_type = "cuda"
        m.gpu_count = torch.cuda.device_count()
        local = int(os.environ.get("LOCAL_RANK", 0))
        if dist_on and local != 0:
            m.nvml = "read by local rank 0 for the whole node"
        else:
            m.nvml, m.nvml_findings = _nvml_findings(host)
        devices = [local] if dist_on else list(range(m.gpu_count))
        n, iters = (8192, 100) if deep else (8192, 50)  # ~1.4 ms per 8192^3 bf16 matmul on an H100
        for i in devices:
            dev = torch.device("cuda", i)
            with torch.cuda.device(dev):
                g = matmul_check(dev, torch.bfloat16, n, iters, burn_s=30.0 if deep else 0.0)
                g.name = torch.cuda.get_device_name(dev)
                g.copy_gbps = copy_bandwidth_gbps(dev, (2 if deep else 1) << 30, 20 if deep else 10)
                m.gpus.append(g)
            torch.cuda.empty_cache()
        ar_dev = torch.device("cuda", local if dist_on else 0)
        ar_bytes, ar_iters = ((1 << 30, 20) if deep else (256 << 20, 10))
    else:
        n = 512 if deep else 256
        for dt in (torch.float32, torch.bfloat16):
            m.cpu_matmul.append(matmul_check(torch.device("cpu"), dt, n, 3))
        ar_dev, ar_bytes, ar_iters = torch.device("cpu"), 4 << 20, 5
    if dist_on and world > 1:
        m.allreduce_bytes = ar_bytes
        m.allreduce_busbw_gbps = allreduce_busbw_gbps(ar_dev, ar_bytes, ar_iters)
    m.efa_devices = efa_devices()
    return m


@dataclass
class PreflightReport:
    checks: list[Check]  # every rank's checks (rank 0 has all of them; other ranks too, gathered)

    @property
    def bad(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    @property
    def healthy(self) -> bool:
        return not self.bad

    def table(self) -> str:
        head = f"{'rank':>4} {'host':<24} {'gpu':>3} {'check':<22} {'stat':<4} {'value':>10} {'unit':<7} {'floor':<12} detail"
        return "\n".join([head, "-" * len(head)] + [c.row() for c in self.checks])

    def summary(self) -> str:
        if self.healthy:
            return f"preflight: healthy ({len(self.checks)} checks)"
        hosts = sorted({c.host for c in self.bad})
        items = "; ".join(f"host {c.host} rank {c.rank}" + (f" GPU {c.gpu}" if c.gpu is not None else "")
                          + f" {c.name}={c.value if c.value is None else f'{c.value:.4g}'}"
                          + (f" (floor {c.floor:g})" if c.floor is not None else "") for c in self.bad)
        return f"preflight: UNHEALTHY hosts {', '.join(hosts)}: {items}"


def run_preflight(deep: bool = False, expected_gpus: int = 0, instance_type: str = "",
                  floor_overrides: dict | None = None, group=None) -> PreflightReport:
    """Measure, judge, and (under a process group) gather every rank's checks over ``group`` (the
    control group; None = default) so all ranks agree."""
    import torch.distributed as dist

    m = measure(deep=deep)
    checks = judge(m, expected_gpus, instance_type, floor_overrides)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, [asdict(c) for c in checks], group=group)
        checks = [Check(**c) for rank_checks in gathered for c in rank_checks]
    return PreflightReport(checks)
