"""The FSDP2 engine's fp8 hook (``train.fsdp_engine.convert_precision``): one call before
``parallelize`` that runs the fp8 surgery for ``trainer.precision=fp8`` and nothing otherwise."""

from __future__ import annotations

import pytest
import torch

from bench.common import preset
from model.transformer import Transformer
from parallelism.process_group import DistContext
from train.config import TrainerConfig
from train.fsdp_engine import convert_precision

pytest.importorskip("torchao", reason="fp8 is the optional extra 'fp8' (torchao), in the test extra")


def test_hook_converts_for_fp8_only(caplog):
    ctx = DistContext()
    with torch.device("meta"):
        bf16, fp8 = Transformer(preset("dsv3_mini")), Transformer(preset("dsv3_mini"))
    assert convert_precision(bf16, TrainerConfig(precision="bf16"), torch.device("cpu"), ctx) is None
    assert not any(type(m).__name__ == "Float8Linear" for m in bf16.modules())
    with caplog.at_level("INFO", logger="moeforge"):
        report = convert_precision(fp8, TrainerConfig(precision="fp8"), torch.device("cpu"), ctx)
    assert report.converted and "output" in report.kept
    # No CUDA device here: the experts keep bf16, and the log line says what was done.
    assert len(report.experts_kept) == 3 and not report.experts_fp8
    assert "linears converted" in caplog.text and "output head" in caplog.text
