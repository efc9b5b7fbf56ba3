"""build_wan's TP split marks on weights built to be loaded (`init_weights=False`).

megatron-core 0.16-0.17 mark a TP linear's weight (`tensor_model_parallel`, `partition_dim`,
`partition_stride`) only inside initialisation; 0.18+ and Transformer Engine's linears mark it when built,
through megatron's `set_tensor_model_parallel_attributes`, which asserts the marks are absent. So
`_tag_tensor_parallel_weights` marks only unmarked weights and refuses a pre-mark that splits the wrong way.
Here the weights are pre-marked with megatron's own setter, as TE and megatron-core 0.18+ do, whatever
megatron-core version runs the test.
"""
from __future__ import annotations

import re

import pytest
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from megatron_regdpo.models.wan.arch import SIZES
from megatron_regdpo.models.wan.build import _SPLIT_DIMS, _tag_tensor_parallel_weights, build_wan

MARKS = ("tensor_model_parallel", "partition_dim", "partition_stride")


def _tp_weights(model) -> list[tuple[str, str, object, int]]:
    """(module name, class name that decides the split, weight, split dim) of every TP linear."""
    out = []
    for name, module in model.named_modules():
        kind = next((c.__name__ for c in type(module).__mro__ if c.__name__ in _SPLIT_DIMS), None)
        if kind is not None:
            out.append((name, kind, module.weight, _SPLIT_DIMS[kind]))
    return out


def _unmarked(pg):
    """A model built to be loaded, with no split marks on its TP weights (0.18+ would have set them)."""
    model = build_wan(SIZES["debug"], pg, init_weights=False)
    weights = _tp_weights(model)
    assert {kind for _, kind, _, _ in weights} == {"ColumnParallelLinear", "RowParallelLinear"}
    for _, _, w, _ in weights:
        for mark in MARKS:
            if hasattr(w, mark):
                delattr(w, mark)
    return model, weights


def test_unmarked_weights_are_marked(pg):
    model, weights = _unmarked(pg)
    _tag_tensor_parallel_weights(model)
    for name, _, w, dim in weights:
        assert (w.tensor_model_parallel, w.partition_dim, w.partition_stride) == (True, dim, 1), name


def test_premarked_weights_are_left_as_they_are(pg):
    model, weights = _unmarked(pg)
    for _, _, w, dim in weights:
        set_tensor_model_parallel_attributes(w, True, dim, 1)  # what TE's reset_parameters does
    before = {name: dict(vars(w)) for name, _, w, _ in weights}
    _tag_tensor_parallel_weights(model)  # megatron's setter would assert if it were called again
    for name, _, w, _ in weights:
        assert vars(w) == before[name], name


def test_a_premark_splitting_another_way_is_refused(pg):
    model, weights = _unmarked(pg)
    for _, _, w, dim in weights:
        set_tensor_model_parallel_attributes(w, True, dim, 1)
    name, kind, w, dim = next(x for x in weights if x[1] == "ColumnParallelLinear")
    w.partition_dim = 1 - dim
    with pytest.raises(ValueError, match=re.escape(name) + ".*" + kind):
        _tag_tensor_parallel_weights(model)


def test_a_premark_saying_not_split_is_refused(pg):
    model, weights = _unmarked(pg)
    for _, _, w, dim in weights:
        set_tensor_model_parallel_attributes(w, True, dim, 1)
    name, kind, w, dim = next(x for x in weights if x[1] == "RowParallelLinear")
    w.tensor_model_parallel = False
    with pytest.raises(ValueError, match=re.escape(name) + ".*" + kind):
        _tag_tensor_parallel_weights(model)
