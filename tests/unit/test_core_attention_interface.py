"""Our attention calls core attention the way megatron-core's TEDotProductAttention needs to be called.

TE cannot be imported on this machine, so TE's signature is read from megatron-core's source file
(megatron/core/extensions/transformer_engine.py, class TEDotProductAttention, method forward) and every
call the Wan attention makes into its core attention, with and without selective recompute, self- and
cross-attention (I2V: text and image), is bound against it.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType

from megatron_regdpo.models.wan.arch import SIZES
from megatron_regdpo.models.wan.attention import ContextParallelSDPAttention, SDPAttention
from megatron_regdpo.models.wan.build import build_wan


def _te_forward_signature() -> inspect.Signature:
    path = importlib.util.find_spec("megatron.core.extensions.transformer_engine").origin
    tree = ast.parse(open(path).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TEDotProductAttention")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    args = fn.args.args
    first_default = len(args) - len(fn.args.defaults)
    params = [inspect.Parameter(a.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                default=None if i >= first_default else inspect.Parameter.empty)
              for i, a in enumerate(args)]
    return inspect.Signature(params)


TE_FORWARD = _te_forward_signature()


def _required(sig: inspect.Signature) -> list[str]:
    return [n for n, p in sig.parameters.items() if p.default is inspect.Parameter.empty]


def test_te_signature_is_what_we_expect_to_meet():
    # the premise of this file: TE's forward requires the mask arguments (no defaults)
    assert _required(TE_FORWARD) == ["self", "query", "key", "value", "attention_mask", "attn_mask_type"]


@pytest.mark.parametrize("cls", [SDPAttention, ContextParallelSDPAttention])
def test_our_core_attention_has_te_interface(cls):
    ours = inspect.signature(cls.forward)
    assert _required(ours) == _required(TE_FORWARD)
    assert list(TE_FORWARD.parameters)[:len(ours.parameters)] == list(ours.parameters)  # same names, same order


class _Recording(torch.nn.Module):
    """Wraps a core attention: binds each call against TE's signature, records it, then runs the real one."""

    def __init__(self, inner, calls):
        super().__init__()
        self.inner, self.calls = inner, calls

    def forward(self, *args, **kwargs):
        bound = TE_FORWARD.bind(self, *args, **kwargs)  # raises TypeError as TE would
        self.calls.append(bound.arguments)
        return self.inner(*args, **kwargs)


ARCHS = {"t2v": SIZES["debug"], "i2v": dataclasses.replace(SIZES["debug"], image_dim=24, in_channels=36, image_tokens=5)}


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_every_core_attention_call_binds_to_te(pg, task, recompute):
    arch = ARCHS[task]
    model = build_wan(arch, pg, recompute=recompute)
    calls: list[dict] = []
    for module in model.modules():
        if hasattr(module, "core_attention") and not isinstance(module.core_attention, _Recording):
            module.core_attention = _Recording(module.core_attention, calls)
    latents = torch.randn(1, arch.in_channels, 1 + 4, 8, 8)
    text = torch.randn(1, 6, arch.text_dim)
    image = torch.randn(1, arch.image_tokens, arch.image_dim) if arch.image_dim else None
    model.train()
    out = model(latents, torch.tensor([500.0]), text, image)
    out.float().square().mean().backward()
    per_layer = 3 if arch.image_dim else 2  # self, cross (text), cross (image)
    # recompute (selective: core attention; full: the layer) calls it again in backward
    assert len(calls) == per_layer * arch.num_layers * (1 if recompute == "none" else 2)
    for call in calls:
        assert call["attention_mask"] is None
        assert call["attn_mask_type"] == AttnMaskType.no_mask
