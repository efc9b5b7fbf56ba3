"""AdamW over FSDP2's sharded parameters, with the interface the trainer uses for megatron-core's
optimizers (prepare_grads, get_grad_norm, clip, step_with_ready_grads, zero_grad, param_groups, checkpoint
state), so one training loop drives both.

The same update as megatron-core's optimizer on CPU and GPU without Apex/TE (torch AdamW, fp32 master
weights, no weight decay on biases and 1-D parameters); the gradient norm counts every element of the
model once over the world (FSDP2Model.parameters_for_norm). Checkpoint keys are megatron's
(`optimizer.state.exp_avg.<param key>`, ...), narrowed to each rank's shard like the weights
(parallel/fsdp2_state.py); the step is one number, given back to every parameter as its own tensor.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
from megatron_regdpo.checkpoint_io.fsdp2_shards import geometry, narrow_to_local
from megatron_regdpo.parallel.fsdp2 import FSDP2Model, local

STATE_KEYS = ("exp_avg", "exp_avg_sq")
# what megatron-core matches a checkpoint's parameter groups by (its _filter_and_reorder_param_groups)
GROUP_IDENTITY = {"wd_mult": 1.0, "lr_mult": 1.0, "is_expert_parallel": False, "is_decoupled_lr": False}


class FSDP2AdamW:
    def __init__(self, model: FSDP2Model, optim):
        self.model = model
        named = [(n, p) for n, p in model.module.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if not (n.endswith(".bias") or p.ndim == 1)]
        no_decay = [p for n, p in named if n.endswith(".bias") or p.ndim == 1]
        # megatron-core's groups and their `wd_mult` (training/optimizer.set_lr applies it every step)
        groups = [g for g in ({"params": decay, "weight_decay": optim.weight_decay, "wd_mult": 1.0},
                              {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0}) if g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
        self.names = {p: n for n, p in named}
        self.mixed = model.config.params_dtype != torch.float32  # fp32 masters of a 16-bit model

    @property
    def param_groups(self) -> list:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def get_parameters(self) -> list:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def prepare_grads(self) -> bool:
        """No loss scaling here (fp32 or bf16): nothing is found infinite before the norm is taken."""
        return False

    def get_grad_norm(self) -> float:
        sq = torch.zeros((), dtype=torch.float32, device=self._device())
        for p in self.model.parameters_for_norm():
            if p.grad is not None:
                sq += local(p.grad).float().pow(2).sum()
        if dist.is_initialized():
            dist.all_reduce(sq)  # each element lives on one rank of the world (see parameters_for_norm)
        return math.sqrt(float(sq))

    def clip_grads(self, max_norm: float, total_norm: float) -> None:
        coeff = max_norm / (total_norm + 1.0e-6)
        if coeff < 1.0:
            grads = [local(p.grad) for p in self.get_parameters() if p.grad is not None]
            torch._foreach_mul_(grads, coeff)

    def step_with_ready_grads(self) -> bool:
        self.optimizer.step()
        return True

    def _device(self) -> torch.device:
        return local(self.get_parameters()[0]).device

    # checkpoint state: training/optimizer.py reaches these through optimizer_checkpoint_state
    def _ensure_state(self) -> None:
        """torch's AdamW creates its state at the first step; a save or load before it needs zeros."""
        for p in self.get_parameters():
            st = self.optimizer.state[p]
            if not st:
                st["step"] = torch.tensor(0.0)
                for k in STATE_KEYS:
                    st[k] = torch.zeros_like(p)

    def _narrowed(self, p, data: torch.Tensor, prefix: str):
        sh = geometry(self.model.module)[self.names[p]]
        narrowed = narrow_to_local(sh, p, local_data=data)
        return None if narrowed is None else dataclasses.replace(narrowed, key=f"{prefix}.{sh.key}")

    def sharded_state_dict(self, model_sharded_state: dict | None = None, is_loading: bool = False, **_) -> dict:
        """megatron-core's own layout of its (non-distributed) optimizer's checkpoint, so that a run resumes
        with FSDP2 on or off: moments under `optimizer.state.exp_avg.<param key>`, the one step in
        `state.common_step`, the groups' hyperparameters (matched by megatron on load by wd_mult, lr_mult,
        ...); with a 16-bit model the fp32 master weights under `optimizer.state.fp32_param.<key>` (the model's
        keys then hold 16-bit weights, FSDP2Model.checkpoint_sharded_state_dict) and the whole nested in
        `optimizer` beside `fp32_from_fp16_params`, as megatron's mixed-precision optimizer writes it."""
        self._ensure_state()
        state, masters = {}, {}
        for p in self.get_parameters():
            st = self.optimizer.state[p]
            for k in STATE_KEYS:
                narrowed = self._narrowed(p, local(st[k]), f"optimizer.state.{k}")
                if narrowed is not None:
                    state.setdefault(self.names[p], {})[k] = narrowed
            # a load reads into fresh memory: the model's load (first) writes the 16-bit weights into the masters
            weights = torch.empty_like(local(p)) if is_loading else local(p)
            master = self._narrowed(p, weights, "optimizer.state.fp32_param") if self.mixed else None
            if master is not None:
                masters[self.names[p]] = master
        steps = {float(self.optimizer.state[p]["step"]) for p in self.get_parameters()}
        if len(steps) != 1:
            raise RuntimeError(f"parameters are at different optimizer steps {sorted(steps)}")
        state["common_step"] = steps.pop()
        groups = [{**GROUP_IDENTITY, **{k: v for k, v in g.items() if k != "params"}} for g in self.param_groups]
        inner = {"state": state, "param_groups": groups}
        return {"optimizer": inner, "fp32_from_fp16_params": masters} if self.mixed else inner

    def load_state_dict(self, loaded: dict) -> None:
        """Moments, step and (16-bit model) master weights; hyperparameters stay the config's."""
        self._ensure_state()
        inner = loaded["optimizer"] if self.mixed else loaded
        by_name = {n: p for p, n in self.names.items()}
        step = float(inner["state"].get("common_step", 0))  # megatron leaves out a step of 0
        with torch.no_grad():
            for name, values in inner["state"].items():
                if name == "common_step":
                    continue
                st = self.optimizer.state[by_name[name]]
                for k, v in values.items():
                    local(st[k]).copy_(v.reshape(local(st[k]).shape))
            for name, v in (loaded.get("fp32_from_fp16_params") or {}).items() if self.mixed else ():
                target = local(by_name[name])
                target.copy_(v.reshape(target.shape))
        for p in self.get_parameters():  # one tensor per parameter: AdamW increments each once per step
            self.optimizer.state[p]["step"] = torch.tensor(step)
