"""health/preflight.py: floors judged from injected measurements; the CLI on CPU in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from health.preflight import (FAIL, OK, SKIP, WARN, GpuMeasurement, Measurements, PreflightReport, judge)

REPO = Path(__file__).resolve().parents[2]


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", AWS_EC2_METADATA_DISABLED="true")


def h100_node(**gpu_over) -> Measurements:
    gpus = [GpuMeasurement(gpu=i, name="NVIDIA H100 80GB HBM3", matmul_tflops=780.0, matmul_rel_err=2e-3,
                           copy_gbps=2950.0) for i in range(8)]
    for i, fields in gpu_over.items():
        for k, v in fields.items():
            setattr(gpus[int(i[1:])], k, v)
    return Measurements(host="ip-10-0-0-7", rank=0, world_size=16, device_type="cuda", gpu_count=8, gpus=gpus,
                        nvml="ok", allreduce_busbw_gbps=850.0, allreduce_bytes=1 << 30,
                        efa_devices=[f"rdmap{i}s0" for i in range(32)])


def by(checks, name, gpu=None):
    return [c for c in checks if c.name == name and (gpu is None or c.gpu == gpu)]


def test_healthy_p5_node():
    checks = judge(h100_node(), expected_gpus=8, instance_type="p5.48xlarge")
    assert PreflightReport(checks).healthy, PreflightReport(checks).table()
    assert by(checks, "matmul_tflops", 0)[0].floor == 600.0
    assert by(checks, "copy_gbps", 0)[0].floor == 2400.0
    assert by(checks, "allreduce_busbw")[0].floor == 800.0
    assert by(checks, "efa")[0].status == OK


def test_slow_gpu_wrong_count_slow_fabric_are_named():
    m = h100_node(g3={"matmul_tflops": 410.0}, g5={"copy_gbps": 1200.0, "matmul_rel_err": 0.3})
    m.gpu_count, m.allreduce_busbw_gbps = 7, 350.0
    rep = PreflightReport(judge(m, expected_gpus=8, instance_type="p5.48xlarge"))
    bad = {(c.name, c.gpu) for c in rep.bad}
    assert bad == {("gpu_count", None), ("matmul_tflops", 3), ("copy_gbps", 5), ("matmul_rel_err", 5),
                   ("allreduce_busbw", None)}
    s = rep.summary()
    assert "UNHEALTHY hosts ip-10-0-0-7" in s and "GPU 3 matmul_tflops=410 (floor 600)" in s


def test_h200_floors_overrides_and_unknown_devices():
    m = h100_node()
    for g in m.gpus:
        g.name, g.copy_gbps = "NVIDIA H200", 3000.0  # fine for an H100, slow for an H200
    assert {c.gpu for c in PreflightReport(judge(m)).bad} == set(range(8))
    assert PreflightReport(judge(m, floor_overrides={"copy_gbps": 2500.0})).healthy
    for g in m.gpus:
        g.name, g.matmul_tflops = "NVIDIA L4", 90.0
    checks = judge(m)
    assert PreflightReport(checks).healthy and by(checks, "matmul_tflops", 0)[0].floor is None


def test_nvml_findings_consistency_and_efa():
    m = h100_node(g2={"matmul_mismatches": 1, "matmul_iters": 5000})
    m.nvml_findings = [{"gpu": 6, "what": "remapped_rows_pending", "raw_value": True, "action": "checkpoint_exit_76"}]
    m.efa_devices = []
    rep = PreflightReport(judge(m, instance_type="p5en.48xlarge"))
    assert {(c.name, c.gpu) for c in rep.bad} == {("nvml", 6), ("matmul_consistency", 2), ("efa", None)}
    m.efa_devices = ["rdmap0s0"] * 4
    assert by(judge(m, instance_type="p5en.48xlarge"), "efa")[0].status == WARN  # fewer than 16: warn only


def test_cpu_only_measurements_pass():
    m = Measurements(host="laptop", cpu_matmul=[GpuMeasurement(gpu=-1, matmul_rel_err=1e-7, matmul_dtype="float32")])
    checks = judge(m)
    assert PreflightReport(checks).healthy
    assert by(checks, "matmul_tflops")[0].status == SKIP and by(checks, "gpu_count")[0].status == SKIP
    assert by(judge(m, expected_gpus=8), "gpu_count")[0].status == FAIL


def test_cli_on_cpu_exits_0_and_skips_gpu_checks(tmp_path):
    out = tmp_path / "pf.json"
    p = subprocess.run([sys.executable, "-m", "health", "preflight", "--json", str(out)], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "preflight: healthy" in p.stdout
    data = json.loads(out.read_text())
    status = {c["name"]: c["status"] for c in data["checks"]}
    assert status["matmul_tflops"] == "skip" and status["copy_gbps"] == "skip" and status["nvml"] == "skip"
    assert [c["status"] for c in data["checks"] if c["name"] == "cpu_matmul_rel_err"] == ["ok", "ok"]


def test_cli_unhealthy_exits_76_naming_the_host():
    p = subprocess.run([sys.executable, "-m", "health", "preflight", "--expected-gpus", "8"], cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 76, p.stdout + p.stderr
    assert "UNHEALTHY hosts" in p.stderr and "gpu_count=0" in p.stderr


def test_cli_bad_arguments_exit_2():
    p = subprocess.run([sys.executable, "-m", "health", "preflight", "--expected-gpus", "x"], cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2


def test_matmul_check_on_cpu_including_the_burn_loop():
    import torch

    from health.preflight import matmul_check

    m = matmul_check(torch.device("cpu"), torch.bfloat16, 64, 2, burn_s=0.1)
    assert m.matmul_rel_err < 1e-2 and m.matmul_tflops > 0
    assert m.matmul_mismatches == 0 and m.matmul_iters >= 10
