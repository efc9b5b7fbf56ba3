"""The only place that builds Megatron-Core's TransformerConfig: from our arch + config sections."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def transformer_config(arch, parallel=None, params_dtype: torch.dtype = torch.float32, fp8: str = "none",
                       recompute: str = "none", init_weights: bool = True) -> TransformerConfig:
    """`parallel` is our config section (None = single rank); fp8 is precision.fp8."""
    tp, pp, cp = (parallel.tp, parallel.pp, parallel.cp) if parallel else (1, 1, 1)
    dtype = params_dtype
    fp8 = None if fp8 == "none" else fp8
    return TransformerConfig(
        num_layers=arch.num_layers, hidden_size=arch.hidden, num_attention_heads=arch.num_heads,
        kv_channels=arch.head_dim, ffn_hidden_size=arch.ffn_dim, layernorm_epsilon=arch.eps,
        add_bias_linear=True, gated_linear_unit=False, activation_func=gelu_tanh,
        bias_activation_fusion=False, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp,
        virtual_pipeline_model_parallel_size=getattr(parallel, "virtual_pp", None),
        sequence_parallel=bool(parallel and parallel.sequence_parallel),
        cp_comm_type=getattr(parallel, "cp_comm", "all_gather") if cp > 1 else None,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        fp8="hybrid" if fp8 else None, fp8_recipe={"delayed": "delayed", "current": "tensorwise"}.get(fp8, "delayed"),
        use_cpu_initialization=True, perform_initialization=init_weights,
        # full recompute is the Wan layer's own (models/wan/layer.py), not megatron's block-level one
        recompute_granularity="selective" if recompute == "selective" else None,
        recompute_modules=["core_attn"] if recompute == "selective" else None,
    )
