"""Fused kernels (Triton), each beside its torch reference, plus capability probes.

Importing this package imports torch only: Triton is imported on the first Triton launch, so that
TRITON_INTERPRET (read when the kernels are defined) can still be set by a test before that.
"""
from .capability import triton_status, triton_usable
from .sq_err import per_sample_sq_err_sum, sq_err_sum_backward_reference, sq_err_sum_reference

__all__ = ["per_sample_sq_err_sum", "sq_err_sum_reference", "sq_err_sum_backward_reference",
           "triton_status", "triton_usable"]
