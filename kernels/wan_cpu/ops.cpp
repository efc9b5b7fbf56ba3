// The operator schemas of the Wan block's fused CPU kernels (namespace regdpo_wan_cpu) and their CPU
// implementations (norms.cpp, rms_rope.cpp, gelu.cpp). Loaded by kernels/wan_cpu/__init__.py.
#include "common.h"

namespace regdpo_wan_cpu {
void register_norms(torch::Library& m);
void register_rms_rope(torch::Library& m);
void register_gelu(torch::Library& m);
}  // namespace regdpo_wan_cpu

TORCH_LIBRARY(regdpo_wan_cpu, m) {
  m.def("layer_norm_forward(Tensor x, float eps, Tensor? weight, Tensor? bias, Tensor? shift, Tensor? scale)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_backward(Tensor grad, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, Tensor? scale,"
        " bool want_dx) -> (Tensor, Tensor, Tensor)");
  m.def("gated_residual(Tensor x, Tensor branch, Tensor gate) -> Tensor");
  m.def("gated_residual_backward(Tensor grad, Tensor branch, Tensor gate, bool want_gate) -> (Tensor, Tensor)");
  m.def("gelu_forward(Tensor x) -> Tensor");
  m.def("gelu_backward(Tensor grad, Tensor x) -> Tensor");
  m.def("rms_sumsq(Tensor x) -> Tensor");
  m.def("rms_apply(Tensor x, Tensor rs, Tensor weight, Tensor? turn) -> Tensor");
  m.def("rms_backward_dot(Tensor grad, Tensor x, Tensor rs, Tensor weight, Tensor? turn, bool want_weight)"
        " -> (Tensor, Tensor)");
  m.def("rms_backward_dx(Tensor grad, Tensor x, Tensor rs, Tensor weight, Tensor? turn, Tensor dot,"
        " float neg_inv_width) -> Tensor");
  m.def("rms_backward(Tensor grad, Tensor x, Tensor rs, Tensor weight, Tensor? turn, bool want_weight,"
        " float neg_inv_width) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(regdpo_wan_cpu, CPU, m) {
  regdpo_wan_cpu::register_norms(m);
  regdpo_wan_cpu::register_rms_rope(m);
  regdpo_wan_cpu::register_gelu(m);
}
