"""The training loop: build, resume, step, log, evaluate, checkpoint, decide together to stop."""

from __future__ import annotations

import logging
import os
import time

import torch

from model.flops import flops_per_token, matmul_params, total_params
from model.transformer import Transformer
from moe.balance import routing_stats
from devices.runtime import Runtime
from train.config import TrainConfig
from health.exit_codes import ExitCode
from moeforge.alerts import alert
from train.engine import build_engine
from train.optim import lr_at, set_lr
from train.step import StepInputs, evaluate
from train.validate import resolved_micro_batch

log = logging.getLogger("moeforge")

STOP_ALERTS = {ExitCode.PREEMPTED: "preemption", ExitCode.UNHEALTHY: "unhealthy"}  # budget: cost.alert_* levels
FIRST_STEP_GRACE_S = 900.0  # compile and first-touch allocations: the hang watchdog waits longer


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str, run_name: str, runtime: Runtime, ctx, start_time: float,
                 health):
        self.cfg, self.run_dir, self.run_name = cfg, run_dir, run_name
        self.runtime, self.ctx, self.start_time, self.hr = runtime, ctx, start_time, health
        self.step = 0
        self.samples = 0  # global data cursor: samples consumed by all ranks together
        self.best_val = float("inf")
        self.evals_since_best = 0
        self.metrics = None
        self._resume_wandb_id = None
        self.saver = None  # train/saving.py, once the checkpoint manager exists
        from train.ops_metrics import OpsMetrics

        self._ops = OpsMetrics()  # checkpoint age, health flags for the row (Prometheus, dashboards)

    # ------------------------------------------------------------------ setup
    def _build(self) -> None:
        from checkpointing.manager import CheckpointManager
        from train.data import build_datasets
        from cost.goodput import RunAccounting

        cfg, t = self.cfg, self.cfg.trainer
        self.train_ds, self.val_ds, self.data_info = build_datasets(cfg.data, cfg.model.vocab_size, None)
        # Meta device first: the engine parallelises (FSDP2: EP -> activation checkpointing ->
        # compile -> FSDP) shards nothing but metadata, then materialises each rank's shards from the seed.
        with torch.device("meta"):
            self.model = Transformer(cfg.model)
        self.micro = resolved_micro_batch(cfg, self.ctx.world_size)
        self.n_micro = t.global_batch_size // (self.ctx.world_size * self.micro)
        self.engine = build_engine(self.model, cfg, self.ctx, self.runtime, self.micro, self.n_micro)
        self.model, self.optimizer = self.engine.model, self.engine.optimizer
        # When this rank reaches the model (and so FSDP's first all-gather) in a step: the straggler
        # detector's measure of how late it arrives (prepend: before FSDP's own pre-forward hook).
        self._fwd_enter = None
        self.model.register_forward_pre_hook(self._mark_forward, prepend=True)
        self.ckpt = CheckpointManager(cfg.checkpoint, self._ckpt_base(), self.run_name, rank=self.ctx.rank,
                                      world_size=self.ctx.world_size, process_group=self.ctx.control_group)
        from train.saving import Saver

        self.saver = Saver(self)
        from cost.node_pricing import price_this_run

        # Each node prices itself (its own IMDS or cluster), one all-gather sums them (cost/nodes.py).
        self.cluster, rate, error = price_this_run(cfg.cluster, cfg.cost, cfg.health, self.ctx)
        if error:  # the same on every rank (from the gathered prices): all exit 2 together
            from moe.config import ConfigError

            raise ConfigError(error)
        self.acct = RunAccounting(self.cluster, cfg.cost, self.run_dir, self.start_time, rank=self.ctx.rank,
                                  rate_usd_per_hour=rate)
        self.cost = self.acct.meter
        self.flops_per_token = flops_per_token(cfg.model, t.seq_len)
        self.kd = None
        if cfg.distill.teacher:  # the teacher's forward FLOPs count in MFU and $/Mtok too
            from train.distill.step import build_kd

            self.kd, teacher_flops = build_kd(cfg, self.ctx, self.runtime)
            self.flops_per_token += teacher_flops

    def _ckpt_base(self) -> str:
        # <checkpoint.root>/<run_name>/step_N; root defaults to the parent of the run directory.
        return self.cfg.checkpoint.root or os.path.dirname(os.path.abspath(self.run_dir))

    def _state(self):
        return self.engine.checkpoint_state()

    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "samples_consumed": self.samples,
            "tokens": self.samples * self.cfg.trainer.seq_len,
            "best_val": None if self.best_val == float("inf") else self.best_val,
            "evals_since_best": self.evals_since_best,
            **self.acct.state_dict(),  # cost, goodput, budget
            "nan_guard": self.hr.nan_guard.state_dict(),
            "wandb_run_id": getattr(self.metrics, "wandb_run_id", None),
            "data": self.data_info,
            "world_size": self.ctx.world_size,
        }

    def _load_latest(self) -> dict | None:
        meta = self.ckpt.load_latest(self._state())
        if meta is None:
            return None
        ts = meta["trainer_state"]
        self.step, self.samples = ts["step"], ts["samples_consumed"]
        self.best_val = float("inf") if ts["best_val"] is None else ts["best_val"]
        self.evals_since_best = ts["evals_since_best"]
        self.hr.nan_guard.load_state_dict(ts.get("nan_guard", {}))
        return ts

    def _resume(self) -> None:
        from cost.heartbeat import read_heartbeat
        from train.agree import from_rank0

        ts = self._load_latest()  # rank 0 chooses the step; every rank loads it, or all stop
        # The attempt record: rank 0 reads heartbeat.json before anyone writes it (acct.resume
        # rewrites it on rank 0) and every rank books the same attempts from its copy.
        hb = from_rank0(read_heartbeat(self.run_dir) if self.ctx.is_main else None, self.ctx.control_group)
        if ts is None:
            log.info("fresh start: no committed checkpoint for run %s", self.run_name)
            log.info(self.acct.resume(None, 0, heartbeat=hb).message())
            return
        log.info(self.acct.resume(ts, self.step, heartbeat=hb).message())
        self._resume_wandb_id = ts.get("wandb_run_id")
        log.info("resumed from step %d (%d samples consumed, saved at world size %s, now %d)", self.step,
                 self.samples, ts.get("world_size", "?"), self.ctx.world_size)

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        self.exit_reason = "crash"
        try:
            code, self.exit_reason = self._run()
            return code
        finally:
            if self.metrics is not None:
                self.metrics.close()

    def finish(self, code: int) -> None:
        """Close this attempt's accounting: called last, after the process group is gone, so the
        paid time covers the whole attempt (every exit path, crashes included)."""
        if hasattr(self, "acct"):
            log.info(self.acct.finish(code, self.exit_reason if code != ExitCode.CRASH else "crash"))

    def _run(self) -> tuple[int, str]:
        from train.metrics import MetricsLogger

        cfg, t = self.cfg, self.cfg.trainer
        self._build()
        self._resume()
        from train.agree import build_together, from_rank0

        # W&B / TensorBoard are built on rank 0: a failure there stops every rank the same way.
        self.metrics = build_together(
            lambda: MetricsLogger(self.run_dir, self.ctx.rank, cfg.logging, run_config=_as_dict(cfg),
                                  resume_wandb_id=self._resume_wandb_id, total_steps=t.max_steps,
                                  start_step=self.step),
            "the metrics logger (logging.wandb / logging.tensorboard)", self.ctx.control_group)
        if self.step >= t.max_steps:
            log.info("run %s is already complete at step %d (trainer.max_steps=%d); outputs in %s. "
                     "Raise trainer.max_steps to train further.", self.run_name, self.step, t.max_steps,
                     self.run_dir)
            return ExitCode.OK, "already complete"
        refusal = from_rank0(self.acct.refuse_start() if self.ctx.is_main else None, self.ctx.control_group)
        if refusal:
            log.warning(refusal)
            return ExitCode.BUDGET_EXHAUSTED, "budget already spent"
        self._announce()
        self.hr.start()  # signals, spot watcher, GPU monitor, hang watchdog (after the slow setup)
        try:
            return self._loop()
        finally:
            t_close = time.perf_counter()
            try:
                self.ckpt.close()  # an async save in flight commits before we exit
            finally:  # the loop is over, but this wait is paid for: it is checkpoint time
                self.acct.ledger.add("checkpoint", time.perf_counter() - t_close)

    def _loop(self) -> tuple[int, str]:
        from train.data import rank_micro_batches, validation_batches
        from cost.goodput import next_save_step

        cfg, t = self.cfg, self.cfg.trainer
        # eval_batches x global_batch_size sequences, the same fixed set at every world size; each
        # rank scores its share in micro-batches.
        val_batches = validation_batches(self.val_ds, t.eval_batches * self.n_micro, self.micro * self.ctx.world_size,
                                         t.seq_len, self.ctx.rank, self.ctx.world_size) if t.eval_every else []
        tokens_per_step = t.global_batch_size * t.seq_len
        window = {"t0": time.perf_counter(), "steps": 0, "data_wait": 0.0}
        inject = set(cfg.health.fault_inject_nan_steps)
        first = True
        from train.profiling import StepProfiler

        profiler = StepProfiler(t.profile_start, t.profile_steps, self.run_dir, self.ctx.rank, self.runtime.device_type)
        while self.step < t.max_steps:
            set_lr(self.optimizer, self._lr(self.step))
            batches = rank_micro_batches(self.train_ds, t.seed, self.samples, t.global_batch_size, self.micro,
                                         t.seq_len, self.ctx.rank, self.ctx.world_size)
            profiler.before_step(self.step + 1)
            t_step = time.perf_counter()
            self._fwd_enter = None
            _inject_delay(cfg.health, self.ctx.rank, self.step + 1)
            with self.hr.grace(FIRST_STEP_GRACE_S if first else 0.0):
                result = self.engine.step(StepInputs(iter(batches), self.n_micro,
                                                     before_optimizer_step=self.ckpt.wait,
                                                     guard=self.hr.nan_guard.check,
                                                     poison=(self.step + 1) in inject, kd=self.kd))
            first = False
            step_s = time.perf_counter() - t_step
            step_s -= self.saver.take_step_wait()  # staging=host: the step waited for a save's host copy
            if result.verdict == "rollback":
                self._rollback()
                continue
            if result.verdict == "stop":
                g = self.hr.nan_guard
                why = (f"health.nan_on_exhausted={g.on_exhausted}" if g.on_exhausted == "stop" else
                       f"still non-finite after {g.rollbacks} rollbacks, health.nan_max_rollbacks={g.max_rollbacks}")
                log.error("non-finite loss or gradients at step %d, %d times in a row (health.nan_max_skips="
                          "%d; %s): stopping without a checkpoint", self.step + 1, g.consecutive,
                          cfg.health.nan_max_skips, why)
                return ExitCode.CRASH, "non-finite training state"
            if result.verdict == "skip":
                log.warning("step %d: non-finite loss or gradient norm, update skipped (%d in a row, at most "
                            "health.nan_max_skips=%d)", self.step + 1, self.hr.nan_guard.consecutive,
                            cfg.health.nan_max_skips)
            self.step += 1
            self.samples += t.global_batch_size
            profiler.after_step(self.step)
            self.acct.on_step(self.step, step_s, result.data_wait_s)
            if self.acct.attempt_steps == 1:  # optimizer state exists now: its size is the save's
                self.saver.estimate_at_start()
            self.hr.step_done(self.step, step_s, (self._fwd_enter or t_step) - t_step)
            window["steps"] += 1
            window["data_wait"] += result.data_wait_s

            val_loss, early = None, None
            if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.max_steps):
                t_eval = time.perf_counter()
                val_loss = evaluate(self.model, val_batches, self.runtime, self.ctx.distributed,
                                    compiled_loss=self.engine.compiled_loss)
                early = self._early_stop(val_loss)
                window["t0"] += time.perf_counter() - t_eval  # evaluation is not training throughput
                self.acct.on_eval(time.perf_counter() - t_eval)
            budget = self.acct.check_budget(self.step, next_save_step(self.step, cfg.checkpoint.every_steps,
                                                                      t.max_steps))
            if budget:
                self.hr.flags.request(ExitCode.BUDGET_EXHAUSTED, budget)
            # Every rank, every step: one small all-reduce decides together whether to stop.
            stop = self.hr.at_boundary(self.step)
            if stop is not None and stop.code in STOP_ALERTS:  # the agreed stop: rank 0 alerts once
                alert(STOP_ALERTS[stop.code], f"step {self.step}: {stop.reason} (exit {stop.code})",
                      "ERROR" if stop.code == ExitCode.UNHEALTHY else "WARN")
            done = self.step >= t.max_steps or early is not None
            code, reason = (stop.code, stop.reason) if stop else (ExitCode.OK, early or "done")
            final = done or stop is not None
            if final:
                self.acct.mark_exit(code, reason)
            # A step's row must reach metrics.jsonl before its checkpoint can commit: a kill between the
            # two would lose the row for good (the next attempt resumes after that step). A save that
            # commits inside the call (async_mode=off, the final and emergency saves) therefore comes
            # after the row, and its stall shows on the next row; an async save commits in the
            # background, after the row, so its own step's row carries what its snapshot cost.
            due = bool(cfg.checkpoint.every_steps) and self.step % cfg.checkpoint.every_steps == 0
            log_now = self.step % t.log_every == 0 or self.step == t.max_steps or val_loss is not None or stop
            if log_now and (final or cfg.checkpoint.async_mode == "off"):
                self._log(result, val_loss, window, tokens_per_step)
                window = {"t0": time.perf_counter(), "steps": 0, "data_wait": 0.0}
                log_now = False
            if final and (cfg.checkpoint.save_final or stop is not None):
                committed = self._save(emergency=stop)
                if stop is not None and not committed and code == ExitCode.PREEMPTED:
                    # 75 promises a committed checkpoint; without one, say crash (bounded retries).
                    code, reason = ExitCode.CRASH, reason + " (the emergency checkpoint was not committed)"
            elif self.saver.wants(due):
                self.saver.periodic(due)
            if log_now:
                self._log(result, val_loss, window, tokens_per_step)
                window = {"t0": time.perf_counter(), "steps": 0, "data_wait": 0.0}
            if self.step % t.log_every == 0:
                warning = self.acct.projection_warning(self.step, t.max_steps, tokens_per_step,
                                                       self.samples * t.seq_len)
                if warning:
                    log.warning(warning)
            self.acct.tick()  # heartbeat, at most every cost.heartbeat_every_s
            if final:
                profiler.close(self.step)
                log.info("stopping at step %d: %s (exit %d)", self.step, reason, code)
                log.info("done: step %d, %d tokens, spent $%.4f; run directory %s", self.step,
                         self.samples * t.seq_len, self.cost.spent_usd(), self.run_dir)
                return code, reason
        return ExitCode.OK, "done"

    def _mark_forward(self, module, args) -> None:
        if self._fwd_enter is None:
            self._fwd_enter = time.perf_counter()

    # ------------------------------------------------------------------ pieces
    def _lr(self, step: int) -> float:
        o = self.cfg.optim
        return lr_at(step, lr=o.lr, max_steps=self.cfg.trainer.max_steps, warmup_steps=o.warmup_steps,
                     schedule=o.schedule, min_lr_ratio=o.min_lr_ratio, decay_fraction=o.decay_fraction)

    def _early_stop(self, val_loss: float) -> str | None:
        t = self.cfg.trainer
        if val_loss < self.best_val - t.early_stop_min_delta:
            self.best_val, self.evals_since_best = val_loss, 0
            return None
        self.evals_since_best += 1
        if t.early_stop_patience and self.evals_since_best >= t.early_stop_patience:
            return (f"validation loss has not improved on {self.best_val:.4f} for {self.evals_since_best} "
                    f"evaluations (trainer.early_stop_patience={t.early_stop_patience})")
        return None

    def _rollback(self) -> None:
        """Back to the last commit, keeping the data cursor: the batches that blew up are skipped,
        not replayed (replaying them would blow up again)."""
        samples = self.samples
        bad_step = self.step + 1
        ts = self._load_latest()
        if ts is None:
            raise RuntimeError(f"non-finite state at step {bad_step} and no committed checkpoint to roll back to")
        self.samples = samples
        self.hr.nan_guard.reset()
        msg = (f"step {bad_step}: non-finite {self.cfg.health.nan_max_skips + 1} times in a row; rolled back to "
               f"the commit at step {self.step} and skipped the data up to sample {samples}")
        log.warning(msg)
        alert("nan_rollback", msg)

    def _save(self, emergency=None) -> bool:
        """Save this step (train/saving.py); True when it is committed."""
        return self.saver.save(emergency)

    def _announce(self) -> None:
        cfg = self.cfg
        log.info("run %s: model %s (%.2fM params, %.2fM active), %s, device %s%s, world size %d",
                 self.run_name, cfg.model.name, total_params(cfg.model) / 1e6,
                 matmul_params(cfg.model) / 1e6, self.data_info.get("description", cfg.data.source),
                 self.runtime.device, f" {cfg.trainer.precision}" if cfg.trainer.precision == "fp8"
                 else " bf16" if self.runtime.amp_dtype else " fp32", self.ctx.world_size)
        log.info("run directory: %s (metrics.jsonl, config.yaml, rank*.log, step_* checkpoints)", self.run_dir)

    def _log(self, result, val_loss, window, tokens_per_step) -> None:
        from cost.throughput import throughput

        cfg, t = self.cfg, self.cfg.trainer
        elapsed, steps = time.perf_counter() - window["t0"], window["steps"]
        loss_t = result.loss.detach().clone()
        if self.ctx.distributed:  # the metric line shows the global mean loss
            torch.distributed.all_reduce(loss_t, op=torch.distributed.ReduceOp.AVG)
        tokens = self.samples * t.seq_len
        tp = throughput(tokens=steps * tokens_per_step, seconds=elapsed, n_devices=self.ctx.world_size,
                        flops_per_token=self.flops_per_token, device=self.runtime.device,
                        peak_override_tflops=cfg.cluster.peak_tflops_override,
                        # None: looked up from the device
                        peak_flops=self.runtime.peak_flops(cfg.cluster.accelerator, cfg.cluster.peak_tflops_override),
                        remaining_steps=t.max_steps - self.step, seconds_per_step=elapsed / max(1, steps))
        m = {"step": self.step, "loss": loss_t.item(), "lr": self._lr(self.step - 1), **tp,
             "mem_gib": _memory_gib(self.runtime), "data_wait": window["data_wait"] / max(elapsed, 1e-9),
             "grad_norm": result.grad_norm.item(), "aux_loss": result.aux_loss.item(),
             "tokens": tokens, "max_steps": t.max_steps, "skipped_steps": self.hr.nan_guard.total_skipped}
        m.update(self.acct.metrics(tokens))
        m.update(self.hr.metrics())
        m.update(self.saver.row_metrics())  # ckpt/stall_s: what checkpointing cost the loop since the last row
        m.update(self._ops.row(self.ckpt, self.hr))
        if val_loss is not None:
            m["val_loss"] = val_loss
        if result.kd_loss is not None:  # loss= stays the cross-entropy; the objective mixes both
            m["kd_loss"], m["lm_loss"] = _mean(result.kd_loss, self.ctx.distributed), m["loss"]
        if self.runtime.xla is not None:  # graphs compiled so far: growing every step = recompiling
            m["xla_compiles"] = self.runtime.xla.compilations()
        if cfg.model.moe.n_experts:
            m.update(routing_stats(self.model))
        self.metrics.log(self.step, m)


def _inject_delay(h, rank: int, step: int) -> None:
    """Fault injection for drills and tests (health.fault_inject_*): a straggler or a hung rank."""
    if rank != h.fault_inject_rank:
        return
    if h.fault_inject_slow_s > 0:
        time.sleep(h.fault_inject_slow_s)
    if h.fault_inject_raise_step and step == h.fault_inject_raise_step:
        raise RuntimeError(f"fault injection: rank {rank} raises before step {step} "
                           f"(health.fault_inject_raise_step={step})")
    if h.fault_inject_hang_step and step == h.fault_inject_hang_step:
        log.warning("fault injection: rank %d hangs before step %d", rank, step)
        while True:
            time.sleep(3600)


def _memory_gib(runtime) -> float:
    device = runtime.device
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    xla_gib = runtime.xla.memory_gib() if runtime.xla is not None else None  # Neuron reports it; XLA:CPU not
    if xla_gib is not None:
        return xla_gib
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _as_dict(cfg: TrainConfig) -> dict:
    import dataclasses

    from train.metrics import redact_secrets

    return redact_secrets(dataclasses.asdict(cfg))


def _mean(t: torch.Tensor, distributed: bool) -> float:
    """The global mean of a per-rank scalar (every rank calls it)."""
    t = t.detach().clone()
    if distributed:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.AVG)
    return t.item()
