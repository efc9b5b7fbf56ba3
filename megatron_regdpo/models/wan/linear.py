"""megatron-core's tensor-parallel linears for the `local` backend, with a leaner matmul underneath.

Legend: S tokens (this rank's slice under sequence parallelism), B batch, I input width, O output width
(this rank's share of a split one).

ColumnParallelLinear and RowParallelLinear stay megatron-core's: parameters, initialisation, TP split,
sharded checkpoint keys and communication pattern are theirs. Only `_forward_impl`, the autograd function
under both, is replaced when none of its GPU-only options is in use (gradient-accumulation fusion into
`main_grad`, deferred weight gradients, GTP rematerialisation): megatron's adds the bias as a separate pass
over the output after a plain matmul (the bias rides in the GEMM here: one `addmm`, as torch's own linear
does) and costs ~0.2 ms of Python per call and direction on CPU. The communication is megatron's, op for op:
- sequence parallel: all-gather the input over TP in forward, gather it again in backward for the weight
  gradient (only this rank's slice is kept), reduce-scatter the input gradient;
- `allreduce_dgrad` (column parallel without SP): all-reduce the input gradient, overlapped with the
  weight gradient's GEMM.
A frozen weight (a LoRA base) gets no weight gradient, as megatron's `linear_with_frozen_weight`.
RowParallelLinear with more than one TP rank keeps megatron's order (matmul, reduce, then the bias once).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel import layers as mcore_layers


class _Lean:
    """With one TP rank and nothing else in play there is nothing to communicate: forward is torch's own
    linear (one addmm; its backward is autograd's, in C++, with no Python per call). megatron's would wrap
    the input in an identity autograd function (the TP region's copy or reduce, both no-ops here) and run
    its Python autograd function around a matmul and a separate bias add."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        return tp_linear(input, weight, *args, **kwargs)

    def _plain(self) -> bool:
        if not hasattr(self, "_single_rank"):
            self._single_rank = dist.get_world_size(self.tp_group) == 1
        return (self._single_rank and not self.skip_bias_add and not self.explicit_expert_comm
                and not getattr(self, "gather_output", False) and not self.config.defer_embedding_wgrad_compute
                and not self.config.gradient_accumulation_fusion and self.config._cpu_offloading_context is None)

    def forward(self, input_, *args, **kwargs):
        if args or kwargs or not self._plain():
            return super().forward(input_, *args, **kwargs)
        return F.linear(input_, self.weight, self.bias), None


class LeanColumnParallelLinear(_Lean, ColumnParallelLinear):
    pass


class LeanRowParallelLinear(_Lean, RowParallelLinear):
    pass


def tp_linear(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
              grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None, gtp_remat_size=1, **more):
    """megatron-core's `_forward_impl` contract (0.16 to 0.19); the GPU-only options go to megatron's."""
    if gradient_accumulation_fusion or grad_output_buffer is not None or (gtp_remat_size or 1) != 1 or more:
        fn = (mcore_layers.linear_with_frozen_weight if not weight.requires_grad
              else mcore_layers.linear_with_grad_accumulation_and_async_allreduce)
        extra = {"gtp_remat_size": gtp_remat_size} if gtp_remat_size != 1 else {}
        return fn(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                  grad_output_buffer=grad_output_buffer, wgrad_deferral_limit=wgrad_deferral_limit,
                  tp_group=tp_group, **extra, **more)
    return _LeanLinear.apply(input, weight, bias, bool(allreduce_dgrad), bool(sequence_parallel), tp_group)


def _gather_seq(x_SBI, group):
    out = x_SBI.new_empty((x_SBI.shape[0] * dist.get_world_size(group), *x_SBI.shape[1:]))
    dist.all_gather_into_tensor(out, x_SBI.contiguous(), group=group)
    return out


def _matmul(x, weight, bias):
    """x [..., I] @ weight.T [I, O] (+ bias) as one GEMM over the flattened leading dimensions."""
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
    return out.view(*x.shape[:-1], weight.shape[0])


class _LeanLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_SBI, weight, bias, allreduce_dgrad: bool, sequence_parallel: bool, group):
        ctx.save_for_backward(x_SBI, weight)
        ctx.flags = (bias is not None, allreduce_dgrad, sequence_parallel, group)
        total = _gather_seq(x_SBI, group) if sequence_parallel else x_SBI
        return _matmul(total, weight, bias)

    @staticmethod
    def backward(ctx, grad_SBO):
        x_SBI, weight = ctx.saved_tensors
        has_bias, allreduce_dgrad, sequence_parallel, group = ctx.flags
        wgrad = ctx.needs_input_grad[1]
        total = _gather_seq(x_SBI, group) if sequence_parallel and wgrad else x_SBI
        g2 = grad_SBO.reshape(-1, grad_SBO.shape[-1])
        dgrad = torch.mm(g2, weight).view(*grad_SBO.shape[:-1], weight.shape[1])
        handle = None
        if sequence_parallel:
            sub = dgrad.new_empty(x_SBI.shape)
            handle = dist.reduce_scatter_tensor(sub, dgrad, group=group, async_op=True)
            dgrad = sub
        elif allreduce_dgrad:
            handle = dist.all_reduce(dgrad, group=group, async_op=True)
        # overlapped with the input gradient's communication, as megatron's
        grad_weight = torch.mm(g2.t(), total.reshape(-1, total.shape[-1])) if wgrad else None
        grad_bias = g2.sum(0) if has_bias and ctx.needs_input_grad[2] else None
        if handle is not None:
            handle.wait()
        return dgrad, grad_weight, grad_bias, None, None, None
