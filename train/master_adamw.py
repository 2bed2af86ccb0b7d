"""AdamW over bf16 compute parameters with fp32 masters (``optim.master_weights=true``).

``param_groups`` hold the model's own parameters (bf16 matmul weights, fp32 norms/embeddings), so
``torch.distributed.checkpoint``'s ``get_state_dict``/``set_state_dict`` key the state by FQN as
for ``torch.optim.AdamW``. Per-parameter state: ``step`` (a CPU scalar, as non-fused AdamW keeps
it), ``exp_avg``, ``exp_avg_sq`` (fp32) and, for bf16 parameters, ``master`` (fp32). The state is
created at construction (the masters exist from the moment of conversion), so DCP never runs its
zero-gradient warm-up step on it.

The update is torch.optim.AdamW's formula (decoupled weight decay, bias correction) on the fp32
value, reading the bf16 gradient, then the bf16 parameter = the master rounded. On CUDA it is one
``torch.compile``'d function over a group's tensor lists: inductor fuses each tensor's update into
one kernel that reads g16, master, m, v and writes master, m, v, p16 (28 B per parameter, against
28 B of fused AdamW plus 12 B of casts around it). The learning rate, bias corrections and the clip
coefficient are 0-dim device tensors filled each step, so nothing recompiles per step and nothing
copies from the host. On CPU the same function runs eagerly.

Clipping rides in the update: ``train.optim.fold_clip`` sets ``clip_coef`` (``folds_clip``), and
every gradient is multiplied by it as it is read, as ``clip_grad_norm`` would have done in place.
Checkpoints carry the masters under the model's keys (``checkpointing.state.AppState``), so a
checkpoint of this mode has the same keys and dtypes as one without it.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch

__all__ = ["MasterAdamW", "adamw_update_"]


def adamw_update_(fp32s: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
                  exp_avg_sqs: List[torch.Tensor], bf16s: List[torch.Tensor], decay: torch.Tensor,
                  neg_step_size: torch.Tensor, bc2_sqrt: torch.Tensor, coef: torch.Tensor,
                  beta1: float, beta2: float, eps: float) -> None:
    """In place, per tensor i: AdamW on ``fp32s[i]`` (a master or an fp32 parameter) with
    ``grads[i] * coef``; ``bf16s[i] = fp32s[i]`` rounded for the first ``len(bf16s)`` tensors.
    ``decay = 1 - lr * weight_decay``, ``neg_step_size = -lr / (1 - beta1^t)``,
    ``bc2_sqrt = sqrt(1 - beta2^t)`` (torch.optim.AdamW's order of operations)."""
    for i, (p, g, m, v) in enumerate(zip(fp32s, grads, exp_avgs, exp_avg_sqs)):
        g32 = g.float() * coef
        p.mul_(decay)
        m.lerp_(g32, 1 - beta1)
        v.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
        denom = (v.sqrt() / bc2_sqrt).add_(eps)
        p.add_(neg_step_size * m / denom)
        if i < len(bf16s):
            bf16s[i].copy_(p)


_compiled_update = None


def _update_fn(device: torch.device, compiled: Optional[bool]):
    global _compiled_update
    if not (device.type == "cuda" if compiled is None else compiled):
        return adamw_update_
    if _compiled_update is None:
        # One graph per group structure (list lengths, shapes, hyperparameters): two for a model.
        _compiled_update = torch.compile(adamw_update_, fullgraph=True, dynamic=False)
    return _compiled_update


class MasterAdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW`` semantics over bf16 parameters with fp32 masters (see module doc)."""

    folds_clip = True  # train.optim.can_fold_clip: clip_coef is applied inside the update
    holds_masters = True  # checkpointing.state.AppState: masters travel under the model's keys

    def __init__(self, params: Iterable, masters: Dict[torch.Tensor, torch.Tensor], lr: float = 1e-3,
                 betas: tuple = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 compiled: Optional[bool] = None):
        # AdamW's other hyperparameter keys, at the values this update implements: a checkpoint's
        # param_groups then have AdamW's keys whichever optimizer wrote it (DCP loads them by key).
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False,
                                      maximize=False, foreach=None, capturable=False, differentiable=False,
                                      fused=None, decoupled_weight_decay=True))
        self.compiled = compiled  # None: compiled on CUDA, eager elsewhere
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                if p.dtype != torch.float32:
                    master = masters.get(p)
                    if master is None or master.dtype != torch.float32 or master.shape != p.shape:
                        raise ValueError(f"MasterAdamW: a {p.dtype} parameter of shape {tuple(p.shape)} "
                                         "has no fp32 master of its shape (train.master_weights.to_bf16_compute)")
                    state["master"] = master

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        coef = self.__dict__.get("clip_coef")
        for group in self.param_groups:
            # Parameters are bucketed by their step count (the same for all unless some had no
            # gradient on some step), masters first so bf16s lines up with the front of fp32s.
            buckets: Dict[float, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] += 1
                buckets.setdefault(float(state["step"]), []).append(p)
            for t, params in buckets.items():
                params.sort(key=lambda p: "master" not in self.state[p])
                self._update(group, t, params, coef)
        return loss

    def _update(self, group: dict, t: float, params: List[torch.Tensor], coef: Optional[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        lr, wd = float(group["lr"]), group["weight_decay"]
        device = params[0].device
        states = [self.state[p] for p in params]
        bf16s = [p for p, s in zip(params, states) if "master" in s]
        fp32s = [s.get("master", p) for p, s in zip(params, states)]

        def scalar(value: float) -> torch.Tensor:  # a fill kernel on CUDA, not a host copy
            return torch.full((), value, dtype=torch.float32, device=device)

        coef_t = scalar(1.0) if coef is None else coef.to(device=device, dtype=torch.float32)
        _update_fn(device, self.compiled)(
            fp32s, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            bf16s, scalar(1 - lr * wd), scalar(-lr / (1 - beta1 ** t)), scalar((1 - beta2 ** t) ** 0.5), coef_t,
            beta1, beta2, group["eps"])

    def load_state_dict(self, state_dict: dict) -> None:
        """``Optimizer.load_state_dict`` casts floating state to the parameter's dtype (bf16 here):
        put the fp32 values back from the dict it was given, and refuse a state without masters."""
        saved = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        super().load_state_dict(state_dict)
        for i, p in zip(saved_ids, params):
            for key, value in saved.get(i, {}).items():
                if key != "step" and torch.is_tensor(value):
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)
        for p in params:
            state = self.state[p]
            missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in state]
            if p.dtype != torch.float32 and "master" not in state:
                missing.append("master")
            if missing:
                raise ValueError(f"optim.master_weights=true: the loaded optimizer state lacks {missing} for a "
                                 f"parameter of shape {tuple(p.shape)}; resume it with the optim.master_weights "
                                 "setting it was saved with")
            if torch.is_tensor(state["step"]):
                state["step"] = state["step"].detach().to("cpu", torch.float32)
