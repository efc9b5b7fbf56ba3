"""The reference errors of DPO behind one interface, whichever way they are obtained.

Legend: P pairs in the micro-batch; B = 2P samples, winners then losers (objectives.flow_matching's
stack_pair); C/F/H/W latent channels, frames, height, width; S_cp this context-parallel rank's tokens.

A step uses it as
    ref.begin_step()                                   # cpu_swap: weights host -> device, once per step
    errs = [ref(mb) for mb in micro_batches]           # (err_ref_w [P], err_ref_l [P]) each, no graph
    ref.end_step()                                     # cpu_swap: device copy dropped
    ... policy forward/backward over the micro-batches ...

Errors are per-sample MEAN squared velocity errors, summed over the CP group before the mean (per_sample.py),
computed exactly as for the policy (`model_errors`), so at initialisation policy and reference agree.
Every forward runs under torch.no_grad(): no graph, no activations kept, no parameter gradients.

Under pipeline parallelism a rank holds one stage, so a model-based reference cannot run on its own: its
`stage` (the policy for lora_base, the frozen copy otherwise) runs as a forward-only pass through
megatron-core's schedule (training/step.py `reference_pass`), with `stage_forward_step` as the schedule's
forward_step; each stage runs its layers and the last one ends with the errors, computed by `output_errors`
as `model_errors` computes them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_regdpo.objectives.flow_matching import split_pair
from megatron_regdpo.objectives.per_sample import per_sample_sq_err
from megatron_regdpo.parallel.data_parallel import unwrap  # noqa: F401  (re-exported)


@dataclass
class ReferenceBatch:
    """One micro-batch as the reference needs it (built with objectives.flow_matching.make_pair_batch)."""

    x_t: torch.Tensor              # [B, C_in, F, H, W] model input (I2V: conditioning channels appended)
    timestep: torch.Tensor         # [B] 1000 * sigma
    text: torch.Tensor             # [B, T, E]
    target: torch.Tensor           # [B, C_out, F, H, W] velocity eps - x0
    image: torch.Tensor | None = None  # [B, I, E] (I2V)
    # the keyed-RNG key the noise and timestep were drawn with: what the `cached` mode looks up
    pair_ids: tuple[int, ...] = ()
    seed: int | None = None
    step: int | None = None
    draw: int = 0


def model_errors(model: torch.nn.Module, batch: ReferenceBatch, cp_group=None) -> torch.Tensor:
    """Per-sample mean squared error [B] of `model` on this rank's token chunk, reduced over `cp_group`."""
    if not (model.pre_process and model.post_process):
        raise ValueError("the reference forward needs the whole model on this rank (pipeline parallelism "
                         "runs it through the schedule, as a forward-only pass)")
    # called, not `forward_tokens`: an FSDP2-sharded model gathers its weights in its forward hooks
    out_BSP = model(batch.x_t, batch.timestep, batch.text, batch.image, return_tokens=True)
    return output_errors(model, out_BSP, batch, cp_group)


def output_errors(model: torch.nn.Module, out_BSP: torch.Tensor, batch: ReferenceBatch, cp_group=None) -> torch.Tensor:
    """Per-sample mean squared error [B] of the last stage's output tokens `out_BSP`, reduced over `cp_group`."""
    model = unwrap(model)
    target_BSP = model.cp_chunk(model.patchify(batch.target))
    return per_sample_sq_err(out_BSP, target_BSP, group=cp_group)


class ReferenceErrors:
    """(err_ref_w [P], err_ref_l [P]) for a micro-batch; `begin_step`/`end_step` bracket a step's calls."""

    mode: str = ""
    stage: torch.nn.Module | None = None  # the model this rank runs (a pipeline stage); None: no forward
    cp_group = None

    def noise_key(self, step: int, epoch: int) -> tuple[int, int]:
        """(step, draw) to draw a micro-batch's keyed noise and timestep with: the training step itself, except
        for the `cached` mode, whose errors exist only for the step key it was computed with (one draw per epoch)."""
        return step, 0

    def begin_step(self) -> None:
        pass

    def end_step(self) -> None:
        pass

    def __call__(self, batch: ReferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            err_B = self._errors(batch).detach()
        return split_pair(err_B)

    def _errors(self, batch: ReferenceBatch) -> torch.Tensor:
        raise NotImplementedError

    def pipelined(self) -> bool:
        """True when this rank holds one stage of a model-based reference (pipeline parallelism): the errors
        then come from a forward-only pass of `stage` through the schedule, not from calling this object."""
        if self.stage is None:
            return False
        model = unwrap(self.stage)
        return not (model.pre_process and model.post_process)

    def stage_context(self):
        """Entered around the pipelined pass (lora_base: adapters off)."""
        return contextlib.nullcontext()

    def stage_forward_step(self, batch_of: Callable[[dict], ReferenceBatch], errors: list) -> Callable:
        """megatron-core's forward_step_func for the pipelined pass: every stage runs `stage` on the
        micro-batch; on the last stage the loss function appends (err_ref_w [P], err_ref_l [P]) to `errors`,
        in micro-batch order, and returns a zero loss (nothing is trained)."""

        def forward_step(data_iterator, chunk):
            batch = batch_of(next(data_iterator))
            out_BSP = chunk(batch.x_t, batch.timestep, batch.text, batch.image, return_tokens=True)

            def loss_func(out_BSP: torch.Tensor):
                errors.append(split_pair(output_errors(chunk, out_BSP, batch, self.cp_group).detach()))
                return out_BSP.new_zeros(()), {}

            return out_BSP, loss_func

        return forward_step
