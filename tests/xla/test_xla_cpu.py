"""``trainer.device=xla`` for real, on torch-xla's CPU runtime (PJRT_DEVICE=CPU): the same code path
torch-neuronx drives on Trainium, minus the Neuron compiler and runtime.

torch-xla pairs with exactly one torch minor (torch-xla 2.9.0 <-> torch 2.9.0), so these run in a
separate environment (docs/backends.md, "Trainium": what has been run); where torch_xla is not
importable every test here skips, saying so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch_xla", reason="torch_xla is not installed: it pairs with one torch minor (torch-xla 2.9 "
                    "needs torch 2.9), so it lives in its own venv; docs/backends.md, Trainium, says how")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
SMALL = ["trainer.seq_len=64", "trainer.global_batch_size=4", "trainer.log_every=1", "logging.progress=off",
         "optim.warmup_steps=2"]
DENSE = ["model.moe.n_experts=0"]


def _train(out: Path, *overrides: str, device: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PJRT_DEVICE": "CPU", "OMP_NUM_THREADS": "1"}
    env.pop("RUN_DIR", None)
    p = subprocess.run([sys.executable, "-m", "train", f"trainer.device={device}", f"output_dir={out}", *SMALL,
                        *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=850)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def _metrics(out: Path) -> list[dict]:
    (path,) = out.glob("*/metrics.jsonl")
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def test_dense_model_matches_cpu_and_stops_compiling(tmp_path):
    common = [*DENSE, "trainer.max_steps=5", "trainer.eval_every=5", "checkpoint.every_steps=0",
              "checkpoint.save_final=false"]
    p = _train(tmp_path / "xla", *common, device="xla")
    _train(tmp_path / "cpu", *common, device="cpu")
    xla, cpu = _metrics(tmp_path / "xla"), _metrics(tmp_path / "cpu")
    assert [r["step"] for r in xla] == [r["step"] for r in cpu] == [1, 2, 3, 4, 5]
    for a, b in zip(xla, cpu):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert xla[-1]["val_loss"] == pytest.approx(cpu[-1]["val_loss"], rel=1e-5)
    compiles = [r["xla_compiles"] for r in xla]
    # The first steps compile the step's graphs (micro-batch, clip, first and later optimizer
    # steps); from then on every step replays them: nothing new to compile (static shapes).
    assert compiles[2] == compiles[3] > 0, compiles
    assert "device xla:0 fp32" in p.stdout and "'xla_device': 'CPU'" in p.stdout
    print(f"dense: losses {[round(r['loss'], 4) for r in xla]}, compiles per step {compiles}")


def test_checkpoint_from_xla_resumes_on_cpu(tmp_path):
    """Save on the XLA device (DCP reads the tensors back to host), resume the same run on CPU:
    the next step equals the uninterrupted CPU run's."""
    common = [*DENSE, "trainer.eval_every=0", "checkpoint.every_steps=3"]
    _train(tmp_path / "run", *common, "trainer.max_steps=3", device="xla")
    assert list((tmp_path / "run").glob("*/step_000000003/COMMITTED"))
    p = _train(tmp_path / "run", *common, "trainer.max_steps=4", device="cpu")
    assert "resumed from step 3" in p.stdout
    _train(tmp_path / "ref", *common, "trainer.max_steps=4", device="cpu")
    resumed, ref = _metrics(tmp_path / "run"), _metrics(tmp_path / "ref")
    assert resumed[-1]["step"] == ref[-1]["step"] == 4
    assert resumed[-1]["loss"] == pytest.approx(ref[-1]["loss"], rel=1e-5)


def test_tiny_moe_runs_and_matches_cpu(tmp_path):
    """The default tiny model (MoE, MLA, sliding window). On XLA the experts take the static-shape
    ``padded`` path (moe/experts.py), so the step compiles once and then replays, whatever the
    routing; the per-expert loop the CPU run takes gives the same losses."""
    common = ["trainer.max_steps=4", "trainer.eval_every=0", "checkpoint.every_steps=0", "checkpoint.save_final=false"]
    _train(tmp_path / "xla", *common, device="xla")
    _train(tmp_path / "cpu", *common, device="cpu")
    xla, cpu = _metrics(tmp_path / "xla"), _metrics(tmp_path / "cpu")
    assert [r["step"] for r in xla] == [r["step"] for r in cpu] == [1, 2, 3, 4]
    for a, b in zip(xla, cpu):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    compiles = [r["xla_compiles"] for r in xla]
    assert compiles[1] == compiles[2] == compiles[3] > 0, compiles  # no graph per routing pattern
    print(f"tiny MoE: losses {[round(r['loss'], 4) for r in xla]}, compiles {[r['xla_compiles'] for r in xla]}")


def test_neuron_device_refuses_a_cpu_runtime(tmp_path):
    p = _train(tmp_path, *DENSE, "trainer.max_steps=1", device="neuron", check=False)
    assert p.returncode != 0
    assert "torch_neuronx" in p.stderr or "no NeuronCore is visible" in p.stderr, p.stderr[-2000:]


def test_runtime_pieces_on_the_cpu_device():
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    import torch

    from devices.runtime import resolve_runtime
    from cost.config import ClusterConfig

    rt = resolve_runtime("xla", "auto")
    assert rt.device.type == "xla" and rt.amp_dtype is None  # auto: fp32 on torch-xla's CPU device
    assert rt.init_device == torch.device("cpu")
    assert resolve_runtime("xla", "bf16").amp_dtype == torch.bfloat16
    x = torch.ones(3, device=rt.device) * 2
    rt.sync()
    assert x.cpu().tolist() == [2.0, 2.0, 2.0] and rt.xla.compilations() >= 1
    with rt.autocast():
        assert (x[None] @ x[:, None]).dtype == torch.float32
    with resolve_runtime("xla", "bf16").autocast():
        assert (x[None] @ x[:, None]).dtype == torch.bfloat16
    # MFU: unknown on a CPU device (n/a), unless overridden; Trainium peaks need the Neuron runtime
    c1, c2 = ClusterConfig(accelerator="Trainium1"), ClusterConfig(peak_tflops_override=2.0)
    assert rt.peak_flops(c1.accelerator, c1.peak_tflops_override) == 0.0
    assert rt.peak_flops(c2.accelerator, c2.peak_tflops_override) == pytest.approx(2e12)
    assert rt.xla.memory_gib() is None  # XLA:CPU reports no allocator stats


def test_the_docs_xla_command_runs_as_written(tmp_path):
    import re
    import shlex

    text = (REPO / "docs" / "backends.md").read_text().split("## Trainium", 1)[1]
    (cmd,) = [c for block in re.findall(r"```bash\n(.*?)```", text, re.S) for c in block.splitlines()
              if c.startswith("PJRT_DEVICE=CPU ")]
    args = shlex.split(cmd)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", args[0].split("=")[0]: "CPU"}
    env.pop("RUN_DIR", None)
    assert args[1] == "python"
    p = subprocess.run([sys.executable, *args[2:], "logging.progress=off"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=850)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "step=5 " in p.stdout and "device xla:0" in p.stdout
