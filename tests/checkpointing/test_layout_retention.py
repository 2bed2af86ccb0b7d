import pytest

from checkpointing import layout
from checkpointing.retention import steps_to_delete


def test_step_dir_names_round_trip():
    assert layout.step_dir_name(123) == "step_000000123"
    assert layout.parse_step("step_000000123") == 123
    assert layout.parse_step("s3://b/run/step_000000007/") == 7
    assert layout.parse_step("step_12") is None
    assert layout.parse_step("COMMITTED") is None
    assert layout.parse_step("step_000000001.tmp") is None
    with pytest.raises(ValueError):
        layout.step_dir_name(-1)


def test_run_dir_resolution():
    assert layout.run_checkpoint_dir("", "outputs", "r1") == "outputs/r1"
    assert layout.run_checkpoint_dir("s3://bkt/prefix/", "outputs", "r1") == "s3://bkt/prefix/r1"
    assert layout.run_checkpoint_dir("/fsx/ckpt", "outputs", "r1") == "/fsx/ckpt/r1"
    assert layout.step_dir("memory://root/r1", 5) == "memory://root/r1/step_000000005"
    assert layout.join("memory://", "r1") == "memory://r1"
    with pytest.raises(ValueError):
        layout.run_checkpoint_dir("", "outputs", "")


def test_meta_adds_versions_and_time():
    meta = layout.build_meta(10, 4, {"tokens": 1000, "samples_consumed": 8, "config_hash": "abc",
                                     "cost_usd": 1.5}, now=0.0)
    assert meta["step"] == 10 and meta["world_size"] == 4 and meta["tokens"] == 1000
    assert set(meta["versions"]) == {"torch", "python", "moeforge"}
    assert meta["saved_at"] == "1970-01-01T00:00:00+00:00"
    meta = layout.build_meta(1, 1, {"versions": {"moeforge": "0.1.0+abc"}})
    assert meta["versions"]["moeforge"] == "0.1.0+abc" and "torch" in meta["versions"]


@pytest.mark.parametrize("steps,keep_last,keep_every,expected", [
    ([], 3, 0, []),
    ([10, 20, 30], 3, 0, []),
    ([10, 20, 30, 40, 50], 3, 0, [10, 20]),
    ([10, 20, 30, 40, 50], 2, 20, [10, 30]),        # keep 40, 50 (last 2) and 20, 40 (every 20th)
    ([50, 10, 30, 20, 40], 1, 0, [10, 20, 30, 40]),  # order of input does not matter
    ([10, 20, 30], 0, 0, []),                        # keep_last 0 = keep everything
    ([5, 10, 15, 20, 25, 30], 1, 10, [5, 15, 25]),
    ([100], 1, 7, []),                               # the newest is never deleted
    ([7, 14, 15], 1, 7, []),
])
def test_retention(steps, keep_last, keep_every, expected):
    assert steps_to_delete(steps, keep_last, keep_every) == expected
