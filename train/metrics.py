"""The metric line, and the logger that sends the same numbers to console, JSONL, W&B and TB.

The line (docs/ARCHITECTURE.md, "Contracts") is stable and regex-friendly; launchers and HyperPod's log
monitoring match it, so fields keep their order and formats:

    step=120 loss=3.4512 lr=3.00e-04 tok/s=18234 tok/s/gpu=9117 mfu=41.2% mem=12.3GiB \
$/Mtok=0.412 spent=$1.23 eta=0:12:34 tok/$=2427184 val_loss=3.5012 data_wait=1.5% nodes=2

(a distillation run adds ``lm_loss=3.4512 kd_loss=0.8123`` after ``val_loss``)

=========  ================  ======================================  =====================
field      metrics dict key  format                                  unit in the dict
=========  ================  ======================================  =====================
step       step              integer                                 optimizer steps
loss       loss              4 decimals                              nats/token
lr         lr                ``%.2e``                                
tok/s      tok_s             integer                                 tokens/s, all ranks
tok/s/gpu  tok_s_gpu         integer                                 tokens/s per device
mfu        mfu               1 decimal + ``%``                       fraction (0.412)
mem        mem_gib           1 decimal + ``GiB``                     peak device GiB
$/Mtok     usd_per_mtok      3 decimals                              $ per 1e6 tokens
spent      spent_usd         ``$`` + 2 decimals                      $ all attempts
eta        eta_s             ``H:MM:SS`` (hours may exceed 24)       seconds
tok/$      tok_per_usd       integer (optional)                      tokens per $
val_loss   val_loss          4 decimals (optional)                   nats/token
lm_loss    lm_loss           4 decimals (optional, distillation)     nats/token (= loss)
kd_loss    kd_loss           4 decimals (optional, distillation)     T^2-scaled KL, nats
data_wait  data_wait         1 decimal + ``%`` (optional)            fraction of step time
ckpt_stall ckpt/stall_s      3 decimals + ``s`` (optional)           seconds lost to checkpointing in the loop
nodes      nodes             integer (optional)                      nodes billed
=========  ================  ======================================  =====================

The first ten fields are always present; an unknown value prints ``n/a`` (MFU on a CPU, $/Mtok
before the first token). Optional fields appear, in this order, only when present in the dict.
``parse_metric_line`` turns a line back into the dict (units as in the table; ``n/a`` -> None).
Every other numeric key (``grad_norm``, ``moe/L1/imbalance``, ...) goes to JSONL/W&B/TB only.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from typing import Any, Dict, IO, Mapping, Optional

from moeforge.alerts import attach_wandb
from train.config import LoggingConfig

NA = "n/a"


def _num(v: Any) -> Optional[float]:
    """float(v) for numbers, 0-dim tensors and numpy scalars; None for None."""
    if v is None:
        return None
    if hasattr(v, "item"):
        v = v.item()
    return float(v)


def _fmt_fixed(v: Any, decimals: int, suffix: str = "", prefix: str = "", scale: float = 1.0) -> str:
    x = _num(v)
    if x is None:
        return NA
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{prefix}{x * scale:.{decimals}f}{suffix}"


def _fmt_lr(v: Any) -> str:
    x = _num(v)
    return NA if x is None else f"{x:.2e}"


def format_duration(seconds: Optional[float]) -> str:
    """``H:MM:SS``; hours are not wrapped at 24 so the value parses back unambiguously."""
    if seconds is None or math.isnan(seconds) or math.isinf(seconds):
        return NA
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def parse_duration(text: str) -> Optional[float]:
    if text == NA:
        return None
    h, m, s = text.split(":")
    return float(int(h) * 3600 + int(m) * 60 + int(s))


# (line name, dict key, formatter, parser). Order is the line order.
_REQUIRED = (
    ("step", "step", lambda v: str(int(v)), int),
    ("loss", "loss", lambda v: _fmt_fixed(v, 4), float),
    ("lr", "lr", _fmt_lr, float),
    ("tok/s", "tok_s", lambda v: _fmt_fixed(v, 0), float),
    ("tok/s/gpu", "tok_s_gpu", lambda v: _fmt_fixed(v, 0), float),
    ("mfu", "mfu", lambda v: _fmt_fixed(v, 1, "%", scale=100.0), lambda t: float(t[:-1]) / 100.0),
    ("mem", "mem_gib", lambda v: _fmt_fixed(v, 1, "GiB"), lambda t: float(t[:-3])),
    ("$/Mtok", "usd_per_mtok", lambda v: _fmt_fixed(v, 3), float),
    ("spent", "spent_usd", lambda v: _fmt_fixed(v, 2, prefix="$"), lambda t: float(t[1:])),
    ("eta", "eta_s", format_duration, parse_duration),
)
_OPTIONAL = (
    ("tok/$", "tok_per_usd", lambda v: _fmt_fixed(v, 0), float),
    ("val_loss", "val_loss", lambda v: _fmt_fixed(v, 4), float),
    # distill.teacher: the cross-entropy (= loss) and the KD term of the objective
    ("lm_loss", "lm_loss", lambda v: _fmt_fixed(v, 4), float),
    ("kd_loss", "kd_loss", lambda v: _fmt_fixed(v, 4), float),
    ("data_wait", "data_wait", lambda v: _fmt_fixed(v, 1, "%", scale=100.0),
     lambda t: float(t[:-1]) / 100.0),
    # Seconds this log step lost to checkpointing in the loop (the snapshot of a save, a staging
    # wait): only on steps that had some.
    ("ckpt_stall", "ckpt/stall_s", lambda v: _fmt_fixed(v, 3, "s"), lambda t: float(t[:-1])),
    ("nodes", "nodes", lambda v: str(int(v)), int),  # nodes billed (cost/nodes.py)
)
LINE_FIELDS = tuple(name for name, *_ in _REQUIRED + _OPTIONAL)
LINE_KEYS = tuple(key for _, key, *_ in _REQUIRED + _OPTIONAL)

_V = r"[^\s=]+"  # one value: no spaces, no '='
_DOLLAR_V = r"\$?" + _V
# The full line, anchored at "step=" (a log prefix such as a timestamp or "[rank0]" may precede
# it). Named groups use the dict keys.
METRIC_LINE_PATTERN = (
    r"(?:^|\s)step=(?P<step>\d+)"
    rf" loss=(?P<loss>{_V}) lr=(?P<lr>{_V})"
    rf" tok/s=(?P<tok_s>{_V}) tok/s/gpu=(?P<tok_s_gpu>{_V})"
    rf" mfu=(?P<mfu>{_V}) mem=(?P<mem_gib>{_V})"
    rf" \$/Mtok=(?P<usd_per_mtok>{_V}) spent=(?P<spent_usd>{_DOLLAR_V}) eta=(?P<eta_s>{_V})"
    rf"(?: tok/\$=(?P<tok_per_usd>{_V}))?"
    rf"(?: val_loss=(?P<val_loss>{_V}))?"
    rf"(?: lm_loss=(?P<lm_loss>{_V}))?"
    rf"(?: kd_loss=(?P<kd_loss>{_V}))?"
    rf"(?: data_wait=(?P<data_wait>{_V}))?"
    rf"(?: ckpt_stall=(?P<ckpt_stall_s>{_V}))?"
    rf"(?: nodes=(?P<nodes>{_V}))?"
    r"\s*$"
)
METRIC_LINE_RE = re.compile(METRIC_LINE_PATTERN)
# For HyperPod EKS logMonitoringConfiguration (regexes over the whole log line):
# progress: any metric line, NaN loss included (job-start and hang detection);
# loss: captures a finite loss for metricThreshold rules.
HYPERPOD_PROGRESS_PATTERN = r".*step=\d+ loss=\S+ lr=.*"
HYPERPOD_LOSS_PATTERN = r".*step=\d+ loss=(\d+\.\d+) .*"


def format_metric_line(m: Mapping[str, Any]) -> str:
    """The stable one-line summary of a log step (see the module docstring for formats)."""
    if m.get("step") is None:
        raise ValueError("a metric line needs 'step'")
    parts = [f"{name}={fmt(m.get(key))}" for name, key, fmt, _ in _REQUIRED]
    parts += [f"{name}={fmt(m[key])}" for name, key, fmt, _ in _OPTIONAL if m.get(key) is not None]
    return " ".join(parts)


def _parse_value(text: str, parser) -> Optional[float]:
    if text == NA:
        return None
    if text in ("nan", "inf", "-inf"):
        return float(text)
    if text.startswith("$") and text[1:] in ("nan", "inf"):
        return float(text[1:])
    return parser(text)


def parse_metric_line(line: str) -> Dict[str, Any]:
    """The dict behind a metric line; raises ValueError when ``line`` holds none."""
    match = METRIC_LINE_RE.search(line.rstrip("\r\n"))
    if match is None:
        raise ValueError(f"not a metric line: {line!r}")
    out: Dict[str, Any] = {}
    for _, key, _, parser in _REQUIRED + _OPTIONAL:
        text = match.group(key.replace("/", "_"))  # a group name cannot hold '/'
        if text is not None:
            out[key] = _parse_value(text, parser)
    return out


# --- secrets -------------------------------------------------------------------------------------

# By key and by value (AWS key ids, user:pass@ in URLs, bearer tokens): train/redact.py.
from train.redact import REDACTED, is_secret_key, redact_secrets  # noqa: E402,F401  (re-exported)


# --- logger --------------------------------------------------------------------------------------


def _scalars(metrics: Mapping[str, Any]) -> Dict[str, float]:
    """Numeric entries of ``metrics`` as Python numbers (tensors and numpy scalars unwrapped)."""
    out: Dict[str, float] = {}
    for k, v in metrics.items():
        if v is None or isinstance(v, (str, bytes)):
            continue
        if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
            v = v.item()
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, (int, float)):
            out[k] = v
    return out


def _json_safe(v: float) -> Optional[float]:
    # NaN/inf are not JSON; a strict reader (jq) would reject the whole file. null it is.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLogger:
    """Rank 0 writes the metric line, ``metrics.jsonl``, W&B and TensorBoard; other ranks no-op.

    ``resume_wandb_id`` is the id stored in the checkpoint; passing it keeps one W&B run across
    attempts. ``start_step`` (the resumed step) lets TensorBoard drop events a killed attempt
    wrote after its last checkpoint.
    """

    def __init__(
        self,
        run_dir: str,
        rank: int,
        cfg: LoggingConfig,
        run_config: Optional[Mapping[str, Any]] = None,
        resume_wandb_id: Optional[str] = None,
        *,
        total_steps: int = 0,
        start_step: int = 0,
        stream: Optional[IO[str]] = None,
    ):
        self.run_dir = run_dir
        self.rank = rank
        self.cfg = cfg
        self.enabled = rank == 0
        self.total_steps = total_steps
        self.stream = stream if stream is not None else sys.stdout
        self.wandb_run_id: Optional[str] = None
        self._wandb_run = None
        self._tb = None
        self._jsonl: Optional[IO[str]] = None
        self._bar_shown = False
        self._last_step = start_step
        self._sinks: list = []
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        safe_config = redact_secrets(dict(run_config or {}))
        if cfg.jsonl:
            self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if cfg.tensorboard:
            self._tb = _open_tensorboard(os.path.join(run_dir, "tensorboard"), start_step)
        if cfg.wandb:
            self._wandb_run = _open_wandb(run_dir, cfg, safe_config, resume_wandb_id)
            self.wandb_run_id = self._wandb_run.id if self._wandb_run is not None else None
            attach_wandb(self._wandb_run)  # moeforge.alerts: wandb.alert for the run's alerts
        self._progress = _progress_enabled(cfg.progress, self.stream)
        from train.prometheus import open_sinks

        self._sinks = open_sinks(cfg, os.path.basename(os.path.normpath(run_dir)))  # /metrics (train/prometheus.py)

    # -- console ----------------------------------------------------------------------------------

    def _clear_bar(self) -> None:
        if self._bar_shown:
            self.stream.write("\r\x1b[K")
            self._bar_shown = False

    def progress(self, step: int, eta_s: Optional[float] = None) -> None:
        """Redraws a one-line progress bar (TTY only); call it every step if you like."""
        if not self.enabled or not self._progress or self.total_steps <= 0:
            return
        frac = min(1.0, max(0.0, step / self.total_steps))
        width = 30
        filled = int(frac * width)
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(
            f"\r\x1b[K[{bar}] {frac * 100:5.1f}% {step}/{self.total_steps} eta={format_duration(eta_s)}"
        )
        self.stream.flush()
        self._bar_shown = True

    def log_text(self, msg: str) -> None:
        if not self.enabled:
            return
        self._clear_bar()
        self.stream.write(msg + "\n")
        self.stream.flush()
        if self._tb is not None:
            self._tb.add_text("log", msg, self._last_step)

    # -- metrics ----------------------------------------------------------------------------------

    def log(self, step: int, metrics: Mapping[str, Any]) -> Optional[str]:
        """Writes one log step everywhere; returns the metric line (None on other ranks)."""
        if not self.enabled:
            return None
        self._last_step = step
        values = dict(metrics)
        values["step"] = step
        line = format_metric_line(values)
        self._clear_bar()
        self.stream.write(line + "\n")
        self.stream.flush()
        if self._progress:
            self.progress(step, _num(values.get("eta_s")))

        scalars = _scalars(values)
        if self._jsonl is not None:
            record = {"step": step, "time": time.time()}
            record.update({k: _json_safe(v) for k, v in scalars.items()})
            self._jsonl.write(json.dumps(record, sort_keys=False) + "\n")
            self._jsonl.flush()
        if self._wandb_run is not None:
            # "step" is our own x-axis (define_metric in _open_wandb): W&B's internal step must
            # increase monotonically, ours may repeat after a resume from an older checkpoint.
            self._wandb_run.log(scalars)
        if self._tb is not None:
            for k, v in scalars.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)
        for sink in self._sinks:
            sink.log(step, scalars)
        return line

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar_shown:
            self.stream.write("\n")
            self.stream.flush()
            self._bar_shown = False
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            attach_wandb(None)
            self._wandb_run.finish()
            self._wandb_run = None
        for sink in self._sinks:
            sink.close()
        self._sinks = []

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _progress_enabled(mode: str, stream: IO[str]) -> bool:
    if mode == "on":
        return True
    if mode == "off":
        return False
    if mode != "auto":
        raise ValueError(f"logging.progress={mode!r} must be auto | on | off")
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def wandb_mode(cfg: LoggingConfig, environ: Mapping[str, str] = os.environ) -> str:
    """The W&B mode to use: ``auto`` is online only when a key or a host is configured.

    An explicit ``WANDB_MODE`` in the environment wins over ``auto`` (wandb's own convention).
    """
    mode = cfg.wandb_mode
    if mode not in ("auto", "online", "offline", "disabled"):
        raise ValueError(
            f"logging.wandb_mode={mode!r} must be auto | online | offline | disabled"
        )
    if mode != "auto":
        return mode
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"]
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_BASE_URL"):
        return "online"
    return "offline"


def _open_wandb(run_dir: str, cfg: LoggingConfig, config: Dict[str, Any], run_id: Optional[str]):
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError(
            "logging.wandb=true but wandb is not installed: "
            "pip install 'moeforge[wandb]' or set logging.wandb=false"
        ) from e
    mode = wandb_mode(cfg)
    from train.redact import redact_command

    # W&B records the command line (sys.argv) in the run's metadata: it sees a redacted copy.
    argv = list(sys.argv)
    sys.argv = argv[:1] + redact_command(argv[1:])
    try:
        run = _wandb_init(wandb, cfg, config, run_dir, run_id, mode)
    finally:
        sys.argv = argv
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def _wandb_init(wandb, cfg: LoggingConfig, config: Dict[str, Any], run_dir: str, run_id: Optional[str], mode: str):
    return wandb.init(
        project=cfg.wandb_project,
        entity=cfg.wandb_entity or None,
        name=str(config.get("run_name") or "") or None,
        id=run_id or None,
        resume="allow",
        dir=run_dir,
        config=config,
        mode=mode,
    )


def _open_tensorboard(log_dir: str, start_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise RuntimeError(
            "logging.tensorboard=true but tensorboard is not installed: "
            "pip install 'moeforge[tensorboard]' or set logging.tensorboard=false"
        ) from e
    # purge_step drops events at or after it that a killed attempt left behind.
    return SummaryWriter(log_dir=log_dir, purge_step=start_step if start_step > 0 else None)
