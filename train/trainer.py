"""The training loop: build, resume, step, log, evaluate, checkpoint, decide to stop."""

from __future__ import annotations

import logging
import os
import time

import torch

from model.flops import flops_per_token, total_params, matmul_params
from moe.balance import routing_stats
from train.build import Runtime, build_model, compile_blocks
from train.config import TrainConfig
from train.exit_codes import EXIT_BUDGET, EXIT_OK
from train.optim import build_optimizer, lr_at, set_lr
from train.step import evaluate, train_step
from train.run_dir import config_hash
from train.validate import resolved_micro_batch

log = logging.getLogger("moeforge")


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str, run_name: str, runtime: Runtime, ctx, start_time: float):
        self.cfg, self.run_dir, self.run_name = cfg, run_dir, run_name
        self.runtime, self.ctx, self.start_time = runtime, ctx, start_time
        self.step = 0
        self.samples = 0  # global data cursor: samples consumed by all ranks together
        self.best_val = float("inf")
        self.evals_since_best = 0

    # ------------------------------------------------------------------ setup
    def _build(self) -> None:
        from checkpointing.manager import CheckpointManager
        from train.goodput import RunAccounting
        from train.data import build_datasets

        cfg, t = self.cfg, self.cfg.trainer
        self.train_ds, self.val_ds, self.data_info = build_datasets(cfg.data, cfg.model.vocab_size, None)
        self.model = build_model(cfg.model, self.runtime, t.seed)
        if t.compile:
            compile_blocks(self.model)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.runtime.device_type)
        self.ckpt = CheckpointManager(cfg.checkpoint, self._ckpt_base(), self.run_name,
                                      rank=self.ctx.rank, world_size=self.ctx.world_size)
        self.acct = RunAccounting(cfg.cluster, cfg.cost, self.run_dir, self.start_time, rank=self.ctx.rank)
        self.cost = self.acct.meter
        self.flops_per_token = flops_per_token(cfg.model, t.seq_len)
        self.micro = resolved_micro_batch(cfg, self.ctx.world_size)
        self.n_micro = t.global_batch_size // (self.ctx.world_size * self.micro)

    def _ckpt_base(self) -> str:
        # <checkpoint.root>/<run_name>/step_N; root defaults to the parent of the run directory.
        return self.cfg.checkpoint.root or os.path.dirname(os.path.abspath(self.run_dir))

    def _state(self) -> dict:
        from checkpointing.state import AppState

        return {"app": AppState(self.model, self.optimizer)}

    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "samples_consumed": self.samples,
            "tokens": self.samples * self.cfg.trainer.seq_len,
            "best_val": None if self.best_val == float("inf") else self.best_val,
            "evals_since_best": self.evals_since_best,
            **self.acct.state_dict(),  # cost, goodput, budget
            "wandb_run_id": getattr(self.metrics, "wandb_run_id", None),
            "data": self.data_info,
        }

    def _resume(self) -> None:
        meta = self.ckpt.load_latest(self._state())
        if meta is None:
            log.info("fresh start: no committed checkpoint for run %s", self.run_name)
            log.info(self.acct.resume(None, 0).message())
            return
        ts = meta["trainer_state"]
        self.step, self.samples = ts["step"], ts["samples_consumed"]
        self.best_val = float("inf") if ts["best_val"] is None else ts["best_val"]
        self.evals_since_best = ts["evals_since_best"]
        log.info(self.acct.resume(ts, self.step).message())
        self._resume_wandb_id = ts.get("wandb_run_id")
        log.info("resumed from step %d (%d samples consumed)", self.step, self.samples)

    # ------------------------------------------------------------------ loop
    def run(self) -> int:
        from train.data import rank_micro_batches, validation_batches
        from train.metrics import MetricsLogger

        cfg, t = self.cfg, self.cfg.trainer
        self._build()
        self._resume_wandb_id = None
        self._resume()
        self.metrics = MetricsLogger(self.run_dir, self.ctx.rank, cfg.logging,
                                     run_config=_as_dict(cfg), resume_wandb_id=self._resume_wandb_id,
                                     total_steps=t.max_steps, start_step=self.step)
        if self.step >= t.max_steps:
            log.info("run %s is already complete at step %d (trainer.max_steps=%d); outputs in %s. "
                     "Raise trainer.max_steps to train further.", self.run_name, self.step, t.max_steps,
                     self.run_dir)
            self.metrics.close()
            log.info(self.acct.finish(EXIT_OK, "already complete"))
            return EXIT_OK
        refusal = self.acct.refuse_start()
        if refusal:
            log.warning(refusal)
            self.metrics.close()
            log.info(self.acct.finish(EXIT_BUDGET, "budget already spent"))
            return EXIT_BUDGET
        self._announce()
        val_batches = validation_batches(self.val_ds, t.eval_batches, self.micro, t.seq_len) if t.eval_every else []
        tokens_per_step = t.global_batch_size * t.seq_len
        window_t0, window_steps, last_saved = time.perf_counter(), 0, self.step
        data_wait = 0.0
        stop_reason, exit_code = None, EXIT_OK
        from train.goodput import next_save_step
        while self.step < t.max_steps and stop_reason is None:
            set_lr(self.optimizer, self._lr(self.step))
            batches = rank_micro_batches(self.train_ds, t.seed, self.samples, t.global_batch_size,
                                             self.micro, t.seq_len, self.ctx.rank, self.ctx.world_size)
            t_step = time.perf_counter()
            result = train_step(self.model, self.optimizer, iter(batches), self.n_micro, self.runtime,
                                t.grad_clip, cfg.model.moe.bias_update_rate,
                                before_optimizer_step=self.ckpt.wait)
            self.step += 1
            self.samples += t.global_batch_size
            self.acct.on_step(self.step, time.perf_counter() - t_step, result.data_wait_s)
            window_steps += 1
            data_wait += result.data_wait_s
            val_loss = None
            if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.max_steps):
                t_eval = time.perf_counter()
                val_loss = evaluate(self.model, val_batches, self.runtime)
                stop_reason = self._early_stop(val_loss)
                window_t0 += time.perf_counter() - t_eval  # evaluation is not training throughput
                self.acct.on_eval(time.perf_counter() - t_eval)
            if stop_reason is None:  # multi-rank: decide on rank 0, share with the stop all-reduce
                budget_stop = self.acct.check_budget(
                    self.step, next_save_step(self.step, cfg.checkpoint.every_steps, t.max_steps))
                if budget_stop:
                    stop_reason, exit_code = budget_stop, EXIT_BUDGET
            if self.step % t.log_every == 0 or self.step == t.max_steps or val_loss is not None:
                elapsed = time.perf_counter() - window_t0
                self._log(result, val_loss, window_steps, elapsed, tokens_per_step, data_wait)
                window_t0, window_steps, data_wait = time.perf_counter(), 0, 0.0
            due = cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0
            final = self.step == t.max_steps or stop_reason is not None
            if final:
                self.acct.mark_exit(exit_code, "done" if exit_code == EXIT_OK else "budget")
            if due or (final and cfg.checkpoint.save_final):
                t_save = time.perf_counter()
                self._save()
                self.acct.on_checkpoint(time.perf_counter() - t_save, self.step)
                last_saved = self.step
            if self.step % t.log_every == 0:
                warning = self.acct.projection_warning(self.step, t.max_steps, tokens_per_step,
                                                       self.samples * t.seq_len)
                if warning:
                    log.warning(warning)
            self.acct.tick()  # heartbeat, at most every cost.heartbeat_every_s
        if stop_reason:
            log.info("stopping: %s", stop_reason)
        log.info("done: step %d, %d tokens, spent $%.4f; run directory %s", self.step,
                 self.samples * t.seq_len, self.cost.spent_usd(), self.run_dir)
        del last_saved
        self.ckpt.close()  # an async save in flight commits before we exit
        self.metrics.close()
        log.info(self.acct.finish(exit_code, stop_reason or "done"))
        return exit_code

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

    def _save(self) -> None:
        from train.version import versions

        ts = self._trainer_state()
        meta = {"tokens": ts["tokens"], "samples_consumed": self.samples,
                "config_hash": config_hash(self.cfg), "cost_usd": ts["cost"].get("spent_usd", 0.0),
                "versions": versions()}
        self.ckpt.save(self.step, self._state(), meta, trainer_state=ts)

    def _announce(self) -> None:
        cfg = self.cfg
        log.info("run %s: model %s (%.2fM params, %.2fM active), %s, device %s%s, world size %d",
                 self.run_name, cfg.model.name, total_params(cfg.model) / 1e6,
                 matmul_params(cfg.model) / 1e6, self.data_info.get("description", cfg.data.source),
                 self.runtime.device, " bf16" if self.runtime.amp_dtype else " fp32", self.ctx.world_size)
        log.info("run directory: %s (metrics.jsonl, config.yaml, rank*.log, step_* checkpoints)", self.run_dir)

    def _log(self, result, val_loss, steps, elapsed, tokens_per_step, data_wait) -> None:
        from train.throughput import throughput

        cfg, t = self.cfg, self.cfg.trainer
        loss = result.loss.item()
        tokens = self.samples * t.seq_len
        tp = throughput(tokens=steps * tokens_per_step, seconds=elapsed, n_devices=self.ctx.world_size,
                        flops_per_token=self.flops_per_token, device=self.runtime.device,
                        peak_override_tflops=cfg.cluster.peak_tflops_override,
                        remaining_steps=t.max_steps - self.step, seconds_per_step=elapsed / max(1, steps))
        m = {"step": self.step, "loss": loss, "lr": self._lr(self.step - 1), **tp,
             "mem_gib": _memory_gib(self.runtime.device), "data_wait": data_wait / max(elapsed, 1e-9),
             "grad_norm": result.grad_norm.item(), "aux_loss": result.aux_loss.item(),
             "tokens": tokens, "max_steps": t.max_steps}
        m.update(self.acct.metrics(tokens))
        if val_loss is not None:
            m["val_loss"] = val_loss
        if cfg.model.moe.n_experts:
            m.update(routing_stats(self.model))
        self.metrics.log(self.step, m)


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _as_dict(cfg: TrainConfig) -> dict:
    import dataclasses

    from train.metrics import redact_secrets

    return redact_secrets(dataclasses.asdict(cfg))
