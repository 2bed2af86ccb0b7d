"""train/metrics.py: the line round-trips, the regex matches a real line, JSONL and TB are written."""

import io
import json
import math
import re

import pytest

from train.config import LoggingConfig
from train.metrics import (
    HYPERPOD_LOSS_PATTERN,
    HYPERPOD_PROGRESS_PATTERN,
    LINE_FIELDS,
    METRIC_LINE_RE,
    MetricsLogger,
    format_metric_line,
    is_secret_key,
    parse_metric_line,
    redact_secrets,
)

FULL = {
    "step": 120, "loss": 3.4512, "lr": 3.0e-4, "tok_s": 18234.0, "tok_s_gpu": 9117.0,
    "mfu": 0.412, "mem_gib": 12.3, "usd_per_mtok": 0.412, "spent_usd": 1.23, "eta_s": 754.0,
    "tok_per_usd": 2427184.0, "val_loss": 3.5012, "lm_loss": 3.4512, "kd_loss": 0.8123, "data_wait": 0.015,
    "ckpt/stall_s": 0.079, "nodes": 2,
}
REAL_LINE = (
    "step=120 loss=3.4512 lr=3.00e-04 tok/s=18234 tok/s/gpu=9117 mfu=41.2% mem=12.3GiB "
    "$/Mtok=0.412 spent=$1.23 eta=0:12:34 tok/$=2427184 val_loss=3.5012 lm_loss=3.4512 kd_loss=0.8123 "
    "data_wait=1.5% ckpt_stall=0.079s nodes=2"
)


def test_format_is_exactly_the_documented_line():
    assert format_metric_line(FULL) == REAL_LINE


def test_round_trip_every_field():
    parsed = parse_metric_line(format_metric_line(FULL))
    assert set(parsed) == set(FULL)
    for key, value in FULL.items():
        assert parsed[key] == pytest.approx(value, rel=1e-3, abs=1e-3), key
    assert [f.split("=")[0] for f in REAL_LINE.split(" ")] == list(LINE_FIELDS)


def test_regex_on_a_real_line_with_a_log_prefix():
    line = "[2026-11-22 02:50:01,123][train][INFO] - " + REAL_LINE
    m = METRIC_LINE_RE.search(line)
    assert m and m.group("step") == "120" and m.group("spent_usd") == "$1.23"
    assert re.match(HYPERPOD_LOSS_PATTERN, line).group(1) == "3.4512"
    assert re.match(HYPERPOD_PROGRESS_PATTERN, line)
    assert parse_metric_line(line)["eta_s"] == 754.0


def test_unknowns_print_na_and_optionals_are_omitted():
    line = format_metric_line({"step": 3, "loss": float("nan"), "lr": 1e-3})
    assert line == (
        "step=3 loss=nan lr=1.00e-03 tok/s=n/a tok/s/gpu=n/a mfu=n/a mem=n/a $/Mtok=n/a "
        "spent=n/a eta=n/a"
    )
    parsed = parse_metric_line(line)
    assert math.isnan(parsed["loss"]) and parsed["mfu"] is None and "val_loss" not in parsed
    assert re.match(HYPERPOD_PROGRESS_PATTERN, line)  # a NaN line still counts as progress
    with pytest.raises(ValueError):
        parse_metric_line("step=3 loss=1.0")


def test_long_eta_and_big_numbers():
    line = format_metric_line({**FULL, "eta_s": 3 * 86400 + 5, "spent_usd": 12345.678})
    assert "eta=72:00:05" in line and "spent=$12345.68" in line
    assert parse_metric_line(line)["eta_s"] == 3 * 86400 + 5


def test_secrets_are_redacted():
    assert is_secret_key("aws_secret_access_key") and is_secret_key("hf_token")
    assert is_secret_key("key") and is_secret_key("wandbApiKey") and is_secret_key("password")
    assert not is_secret_key("tokenizer") and not is_secret_key("keep_last")
    assert not is_secret_key("tokens_per_step")
    cfg = {"checkpoint": {"storage_options": {"key": "AKIA", "secret": "s"}, "keep_last": 3},
           "data": {"tokenizer": "gpt2"}}
    red = redact_secrets(cfg)
    assert red["checkpoint"]["storage_options"] == {"key": "<redacted>", "secret": "<redacted>"}
    assert red["checkpoint"]["keep_last"] == 3 and red["data"]["tokenizer"] == "gpt2"
    assert "AKIA" not in json.dumps(red)


def test_logger_writes_console_and_jsonl(tmp_path):
    out = io.StringIO()
    cfg = LoggingConfig(progress="off")
    with MetricsLogger(str(tmp_path), 0, cfg, {"run_name": "t"}, stream=out) as lg:
        for step in (10, 20):
            lg.log(step, {**FULL, "moe/L1/imbalance": 1.25, "grad_norm": 0.5, "note": "x"})
        lg.log_text("saved checkpoint step_000000020")
    lines = out.getvalue().splitlines()
    assert parse_metric_line(lines[0])["step"] == 10 and parse_metric_line(lines[1])["step"] == 20
    assert lines[2] == "saved checkpoint step_000000020"
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20]
    assert rows[0]["moe/L1/imbalance"] == 1.25 and rows[0]["grad_norm"] == 0.5
    assert rows[0]["loss"] == FULL["loss"] and "note" not in rows[0]
    # appending after a restart keeps earlier rows
    with MetricsLogger(str(tmp_path), 0, cfg, stream=io.StringIO()) as lg:
        lg.log(30, {"loss": float("inf"), "lr": 1e-4})
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30] and rows[2]["loss"] is None


def test_other_ranks_write_nothing(tmp_path):
    out = io.StringIO()
    lg = MetricsLogger(str(tmp_path / "r1"), 1, LoggingConfig(wandb=True, tensorboard=True),
                       stream=out)
    assert lg.log(1, FULL) is None and lg.wandb_run_id is None
    lg.close()
    assert out.getvalue() == "" and not (tmp_path / "r1").exists()


def test_progress_bar_on_tty(tmp_path):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    lg = MetricsLogger(str(tmp_path), 0, LoggingConfig(jsonl=False), total_steps=100, stream=out)
    lg.progress(5, 60.0)
    lg.log(10, FULL)
    lg.close()
    text = out.getvalue()
    assert "\r" in text and "5/100" in text
    # the metric line itself sits on a clean line of its own
    assert any(METRIC_LINE_RE.fullmatch(l) for l in text.replace("\x1b[K", "").split("\r"))


def test_tensorboard_read_back(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = LoggingConfig(tensorboard=True, jsonl=False, progress="off")
    with MetricsLogger(str(tmp_path), 0, cfg, stream=io.StringIO()) as lg:
        lg.log(1, {"loss": 4.0, "lr": 1e-3, "moe/L1/imbalance": 1.5})
        lg.log(2, {"loss": 3.0, "lr": 1e-3, "moe/L1/imbalance": 1.25})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert loss == [(1, 4.0), (2, 3.0)]
    assert [e.value for e in acc.Scalars("moe/L1/imbalance")] == [1.5, 1.25]


def test_tensorboard_resume_purges_steps_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = LoggingConfig(tensorboard=True, jsonl=False, progress="off")
    with MetricsLogger(str(tmp_path), 0, cfg, stream=io.StringIO()) as lg:
        for step in (1, 2, 3):
            lg.log(step, {"loss": 10.0 - step, "lr": 1e-3})
    # killed after step 3, resumed from a checkpoint at step 1: steps 2.. are logged again
    with MetricsLogger(str(tmp_path), 0, cfg, start_step=2, stream=io.StringIO()) as lg:
        lg.log(2, {"loss": 5.0, "lr": 1e-3})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 9.0), (2, 5.0)]
