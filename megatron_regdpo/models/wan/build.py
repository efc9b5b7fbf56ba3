"""build_wan: the one function that turns an architecture + config sections into this rank's model.

Order (torchtitan's): choose the layer spec (te|local, FP8 capability comes with te; full recompute is a
property of the layer, see layer.py), build the stage's modules with TP-sharded linears, attach activation
offloading to the layers (parallel/offload.py; `model.activation_offload`); LoRA and data-parallel wrapping
follow in the trainer's setup.
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from megatron_regdpo.config.mcore import transformer_config
from megatron_regdpo.parallel.offload import ActivationOffload

from .arch import WanArch
from .model import WanModel
from .spec import wan_layer_spec


def build_wan(arch: WanArch, pg_collection, parallel=None, params_dtype: torch.dtype = torch.float32,
              fp8: str = "none", backend: str = "local", recompute: str = "none", init_weights: bool = True,
              vp_stage=None, offload_activations: bool = False) -> WanModel:
    """This rank's stage of the model. `init_weights=False` leaves weights uninitialised (to be loaded).
    `offload_activations` (full recompute): the layers' saved inputs go to host memory."""
    config = transformer_config(arch, parallel, params_dtype, fp8, recompute, init_weights)
    pp_rank = torch.distributed.get_rank(pg_collection.pp)
    pp_size = torch.distributed.get_world_size(pg_collection.pp)
    spec = wan_layer_spec(backend, with_image=arch.image_dim is not None, image_tokens=arch.image_tokens,
                          cross_attn_norm=arch.cross_attn_norm,
                          cp_size=torch.distributed.get_world_size(pg_collection.cp),
                          recompute_full=recompute == "full")
    model = WanModel(config, arch, spec, pg_collection, pre_process=pp_rank == 0,
                     post_process=pp_rank == pp_size - 1, vp_stage=vp_stage)
    if not init_weights:
        _tag_tensor_parallel_weights(model)
    model.activation_offload = None
    if offload_activations:
        if recompute != "full":
            raise ValueError(f"activation offloading needs full recompute, got recompute={recompute!r}")
        model.activation_offload = ActivationOffload().attach(model.decoder.layers)
    return model.to(config.params_dtype)


_SPLIT_DIMS = {"ColumnParallelLinear": 0, "TEColumnParallelLinear": 0, "RowParallelLinear": 1, "TERowParallelLinear": 1}


def _tag_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """A TP linear's weight must carry the split marks (`tensor_model_parallel`, `partition_dim`) that grad
    norms, DDP and optimizers read. megatron-core 0.16-0.17 set them only inside initialisation, 0.18+
    and Transformer Engine's linears also when built to be loaded; megatron's setter asserts they are
    absent, so only unmarked weights are marked (whatever the version)."""
    for name, module in model.named_modules():
        split_dim = next((_SPLIT_DIMS[c.__name__] for c in type(module).__mro__ if c.__name__ in _SPLIT_DIMS), None)
        weight = getattr(module, "weight", None)
        if split_dim is None or weight is None:
            continue
        if hasattr(weight, "tensor_model_parallel"):
            found = (weight.tensor_model_parallel, getattr(weight, "partition_dim", None))
            if found != (True, split_dim):
                raise ValueError(f"{name} ({type(module).__name__}): weight marked tensor_model_parallel="
                                 f"{found[0]}, partition_dim={found[1]}; a {type(module).__name__} splits "
                                 f"dim {split_dim}")
        else:
            set_tensor_model_parallel_attributes(weight, True, split_dim, 1)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
