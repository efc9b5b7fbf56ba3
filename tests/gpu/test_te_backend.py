"""GPU only: the `te` spec (Transformer Engine linears + attention) computes what the `local` spec does.

Skipped on machines without CUDA or without Transformer Engine (the `gpu` extra). Figures go to
docs/benchmarks.md with the card's name.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                       reason="needs Transformer Engine (pip install -e '.[gpu]')"),
]


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_te_matches_local_bf16(pg, task):
    import dataclasses

    from megatron_regdpo.models.wan.arch import SIZES
    from megatron_regdpo.models.wan.build import build_wan
    from megatron_regdpo.models.wan.convert import random_inputs

    arch = dataclasses.replace(SIZES["debug"], num_heads=4, head_dim=64, ffn_dim=512)
    if task == "i2v":
        arch = dataclasses.replace(arch, image_dim=64, in_channels=36, image_tokens=9)
    local = build_wan(arch, pg, params_dtype=torch.bfloat16, backend="local").cuda().eval()
    te = build_wan(arch, pg, params_dtype=torch.bfloat16, backend="te", init_weights=False).cuda().eval()
    own = {k: v for k, v in local.state_dict().items() if not k.endswith("_extra_state")}
    te.load_state_dict(own, strict=False)
    x, t, txt, img = (None if a is None else a.cuda() for a in random_inputs(arch, latent=(5, 16, 16), text_len=64))
    with torch.no_grad():
        want = local(x.bfloat16(), t, txt.bfloat16(), None if img is None else img.bfloat16()).float()
        got = te(x.bfloat16(), t, txt.bfloat16(), None if img is None else img.bfloat16()).float()
    rel = ((got - want).norm() / want.norm()).item()
    print(f"{task}: te vs local bf16 relative error {rel:.3e} on {torch.cuda.get_device_name()}")
    assert rel < 2e-2
