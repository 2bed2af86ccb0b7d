"""The torch-xla device behind ``trainer.device=neuron`` (Trainium via torch-neuronx) and ``xla``
(any PJRT device: ``PJRT_DEVICE=CPU`` is how the tests run it). Imported only for those devices:
nothing else in the core imports torch_xla.

Where the trainer cuts the lazy graph (``torch_xla.sync()``, formerly ``xm.mark_step()``;
train/step.py): after each micro-batch's backward, so one traced graph holds one forward and
backward whatever the accumulation count; after the optimizer step (which, on one device, is the
plain ``optimizer.step()``: ``xm.optimizer_step`` only adds the cross-replica gradient all-reduce);
and after each evaluation batch. The non-finite guard's read of the gradient norm runs the
clipping graph in between. With static shapes every step then replays the same few compiled
graphs; the first step compiles them (``neuron_parallel_compile`` does it ahead of time on
Trainium).

Initialisation happens on CPU and the model moves afterwards (``Runtime.init_device``): XLA
devices have no ``torch.Generator``, and a CPU init makes the weights bit-identical to a CPU run.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

import torch

log = logging.getLogger("moeforge")

NEURON_INSTALL = ("torch-neuronx comes from AWS's pip repository, not PyPI: pip install torch-neuronx "
                  "neuronx-cc --extra-index-url https://pip.repos.neuron.amazonaws.com "
                  "(docs/backends.md, Trainium)")


class XlaRuntime:
    """One process's XLA device, its sync point and what the metric line needs from it."""

    def __init__(self, device_kind: str):
        try:
            import torch_xla
            import torch_xla.runtime as xr
        except ImportError as e:
            hint = NEURON_INSTALL if device_kind == "neuron" else "pip install torch-xla (the release paired with your torch)"
            raise RuntimeError(f"trainer.device={device_kind} needs torch_xla, which is not importable ({e}): {hint}") from e
        if device_kind == "neuron":
            try:
                import torch_neuronx  # noqa: F401  (registers the Neuron PJRT plugin and its ops)
            except ImportError as e:
                raise RuntimeError(f"trainer.device=neuron needs torch_neuronx ({e}): {NEURON_INSTALL}") from e
        self._torch_xla = torch_xla
        self.kind = device_kind
        self.hw_type = str(xr.device_type() or "")  # NEURON, CPU, TPU, CUDA
        if device_kind == "neuron" and self.hw_type.upper() != "NEURON":
            raise RuntimeError(f"trainer.device=neuron but torch-xla's device is {self.hw_type!r} "
                               f"(PJRT_DEVICE={os.environ.get('PJRT_DEVICE', '')!r}): no NeuronCore is visible. "
                               "On other hardware use trainer.device=xla (or cpu/cuda)")
        self.device = _xla_device(torch_xla)

    def sync(self) -> None:
        """Cut the pending lazy graph and run it asynchronously."""
        fn = getattr(self._torch_xla, "sync", None)
        if fn is not None:
            fn()
        else:  # torch-xla < 2.5: only the older spelling
            import torch_xla.core.xla_model as xm

            xm.mark_step()

    @property
    def is_neuron(self) -> bool:
        return self.hw_type.upper() == "NEURON"

    def default_precision(self) -> str:
        """``trainer.precision=auto``: bf16 autocast on accelerators, fp32 on torch-xla's CPU device."""
        return "fp32" if self.hw_type.upper() == "CPU" else "bf16"

    def peak_flops(self, accelerator: str, peak_tflops_override: float = 0.0) -> float:
        """Dense bf16 peak of what one process drives (FLOP/s); 0 = unknown (MFU prints n/a).
        ``accelerator`` and ``peak_tflops_override`` are the ``cluster`` fields of those names.

        On Trainium a process drives one (logical) NeuronCore, not a chip: the chip's peak over its
        physical cores, times the cores a logical core groups (NEURON_LOGICAL_NC_CONFIG; the
        default is 2 on Trainium2, 1 on Trainium1)."""
        from devices.peaks import neuroncore_peak_flops, normalize_accelerator

        if peak_tflops_override > 0:
            return peak_tflops_override * 1e12
        if not self.is_neuron:
            return 0.0
        name = normalize_accelerator(accelerator)
        lnc = os.environ.get("NEURON_LOGICAL_NC_CONFIG")
        peak = neuroncore_peak_flops(name, int(lnc) if lnc and lnc.isdigit() else None)
        if peak == 0.0:
            log.warning("MFU: cluster.accelerator=%r is not a Trainium generation; pick cluster=trn1.32xlarge "
                        "(or trn1n/trn2), set cluster.accelerator, or cluster.peak_tflops_override", accelerator)
        return peak

    def memory_gib(self) -> Optional[float]:
        """Device memory in use (GiB), where the runtime reports it (not on torch-xla's CPU device)."""
        import torch_xla.core.xla_model as xm

        try:
            info = xm.get_memory_info(self.device)
        except (RuntimeError, AttributeError):
            return None
        if "bytes_used" in info:
            used = info["bytes_used"]
        elif "kb_total" in info:  # older torch-xla
            used = (info["kb_total"] - info["kb_free"]) * 1024
        else:
            return None
        return float(used) / 2**30

    def compilations(self) -> int:
        """Graphs compiled so far by this process (torch-xla's CompileTime metric)."""
        import torch_xla.debug.metrics as met

        data = met.metric_data("CompileTime")
        return int(data[0]) if data else 0

    def versions(self) -> Dict[str, Optional[str]]:
        out: Dict[str, Optional[str]] = {"torch_xla": getattr(self._torch_xla, "__version__", None),
                                         "xla_device": self.hw_type}
        try:
            import torch_neuronx

            out["torch_neuronx"] = getattr(torch_neuronx, "__version__", None)
        except ImportError:
            out["torch_neuronx"] = None  # torch-xla alone (trainer.device=xla)
        return out


def _xla_device(torch_xla: Any) -> torch.device:
    fn = getattr(torch_xla, "device", None)
    if fn is not None:
        return fn()
    import torch_xla.core.xla_model as xm  # torch-xla < 2.5

    return xm.xla_device()
