"""Per-sample sum of squared errors: [N, ...] x [N, ...] -> [N] float32, forward and backward."""
from .function import per_sample_sq_err_sum
from .reference import sq_err_sum_backward_reference, sq_err_sum_reference

__all__ = ["per_sample_sq_err_sum", "sq_err_sum_reference", "sq_err_sum_backward_reference"]
