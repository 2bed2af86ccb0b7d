"""EFA detection on a fake sysfs tree, the settings applied only with EFA and never over the
user's, the libfabric-version rule, and the versions report (runs without a GPU or EFA)."""

import os

from parallelism.efa import apply_efa_env, detect_efa, libfabric_version, versions_report


def _sysfs(tmp_path, devices):
    root = tmp_path / "sys"
    drivers = root / "bus" / "pci" / "drivers"
    for name, driver in devices.items():
        (drivers / driver).mkdir(parents=True, exist_ok=True)
        dev = root / "class" / "infiniband" / name / "device"
        dev.mkdir(parents=True)
        os.symlink(drivers / driver, dev / "driver")
    return str(root)


def test_no_efa_sets_nothing(tmp_path):
    root = _sysfs(tmp_path, {"mlx5_0": "mlx5_core"})
    env = {}
    rep = apply_efa_env(env, sysfs_root=root, fi_info=lambda: None)
    assert rep["efa_devices"] == [] and rep["set"] == [] and env == {}


def test_efa_by_driver_sets_recommended_keeps_user_values(tmp_path):
    root = _sysfs(tmp_path, {"rdmap16s27": "efa", "rdmap32s27": "efa", "mlx5_0": "mlx5_core"})
    env = {"NCCL_SOCKET_IFNAME": "ens5"}
    rep = apply_efa_env(env, sysfs_root=root, fi_info_version=lambda: "fi_info: 1.22.0\nlibfabric: 1.22.0amzn1.0")
    assert rep["efa_devices"] == ["rdmap16s27", "rdmap32s27"]
    assert rep["libfabric"] == (1, 22)
    assert env["FI_PROVIDER"] == "efa"
    assert env["NCCL_SOCKET_IFNAME"] == "ens5" and rep["kept"] == {"NCCL_SOCKET_IFNAME": "ens5"}
    assert "FI_EFA_USE_DEVICE_RDMA" not in env  # libfabric >= 1.18 enables RDMA by itself
    for key in ("FI_EFA_SET_CUDA_SYNC_MEMOPS", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_DUMP_ON_TIMEOUT",
                "TORCH_NCCL_TRACE_BUFFER_SIZE"):
        assert key in env
    assert all(s.reason for s in rep["set"])


def test_old_libfabric_gets_device_rdma(tmp_path):
    root = _sysfs(tmp_path, {"efa_0": "whatever"})  # name alone is enough
    env = {}
    rep = apply_efa_env(env, sysfs_root=root, fi_info_version=lambda: "libfabric: 1.15.2")
    assert env["FI_EFA_USE_DEVICE_RDMA"] == "1" and rep["libfabric"] == (1, 15)


def test_fi_info_fallback(tmp_path):
    out = "provider: efa\n    fabric: efa\n    domain: rdmap0s31-rdm\n    version: 120.0\n"
    assert detect_efa(str(tmp_path / "empty"), fi_info=lambda: out) == ["rdmap0s31-rdm"]
    assert detect_efa(str(tmp_path / "empty"), fi_info=lambda: "provider: tcp\n") == []
    assert libfabric_version(lambda: None) is None


def test_versions_report_runs_here():
    rep = versions_report()
    import torch

    assert rep["torch"] == torch.__version__
    assert set(rep) >= {"torch", "cuda_runtime", "nccl", "cuda_driver", "libfabric", "aws_ofi_nccl"}
