"""The Reg-DPO objective as pure tensor math: flow matching with keyed RNG, per-sample error under context
parallelism, and the loss. Imports only torch and the standard library: model, method and data stay separate,
and the trainer is the one place that knows all three.
"""
from .flow_matching import (
    FlowMatchingSettings, PairBatch, key_seed, make_pair_batch, model_timestep, noisy_latent, pair_noise,
    pair_timestep, shift_sigma, split_pair, stack_pair, velocity_target,
)
from .per_sample import per_sample_sq_err, sum_across_group, torch_sq_err_sum
from .reg_dpo import RegDPOOutput, RegDPOSettings, normalize_loss_sum, reg_dpo_loss, reg_dpo_metrics

__all__ = [
    "FlowMatchingSettings", "PairBatch", "key_seed", "make_pair_batch", "model_timestep", "noisy_latent",
    "pair_noise", "pair_timestep", "shift_sigma", "split_pair", "stack_pair", "velocity_target",
    "per_sample_sq_err", "sum_across_group", "torch_sq_err_sum",
    "RegDPOOutput", "RegDPOSettings", "normalize_loss_sum", "reg_dpo_loss", "reg_dpo_metrics",
]
