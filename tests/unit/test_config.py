"""Config loading (inheritance, overrides, strict typing) and cross-field validation."""

from __future__ import annotations

import dataclasses
import textwrap
from types import SimpleNamespace

import pytest
import yaml

from megatron_regdpo.config import (
    Config,
    ConfigError,
    Layout,
    dump_yaml,
    from_dict,
    load_config,
    parse_overrides,
    validate,
    with_overrides,
)

MINIMAL = {"run": {"name": "t"}, "model": {"size": "debug"}}


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def make(**sections) -> Config:
    """A Config from MINIMAL with sections merged in, e.g. make(parallel={"tp": 2})."""
    data = {**MINIMAL}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return from_dict(data)


def arch(layers=40, heads=40, head_dim=128):
    return SimpleNamespace(num_layers=layers, num_heads=heads, head_dim=head_dim)


def errors_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------- loading


def test_minimal_gets_defaults(tmp_path):
    cfg = load_config(write(tmp_path / "a.yaml", "run: {name: a}\nmodel: {size: 14B}\n"))
    assert cfg.run.name == "a" and cfg.model.size == "14B"
    assert cfg.parallel.tp == 1 and cfg.objective.reference.mode == "resident"
    assert cfg.lora.targets[0] == "linear_qkv" and isinstance(cfg.optim.betas, tuple)
    hash(cfg)  # tuples all the way down


def test_inheritance_deep_merges_relative_base(tmp_path):
    write(tmp_path / "base" / "common.yaml", """
        run: {name: base, seed: 7}
        model: {size: 14B}
        parallel: {tp: 2, pp: 2}
        lora: {targets: [linear_qkv, linear_proj]}
        objective: {beta: 100, reference: {mode: cached}}
    """)
    write(tmp_path / "mid.yaml", "base: base/common.yaml\nparallel: {pp: 4}\n")
    child = write(tmp_path / "exp" / "child.yaml", """
        base: ../mid.yaml
        run: {name: child}
        lora: {targets: [linear_fc1]}
        objective: {reference: {mode: lora_base}}
    """)
    cfg = load_config(child)
    assert cfg.run == dataclasses.replace(cfg.run, name="child", seed=7)  # merged, not replaced
    assert (cfg.parallel.tp, cfg.parallel.pp) == (2, 4)
    assert cfg.lora.targets == ("linear_fc1",)  # lists replace
    assert cfg.objective.beta == 100.0 and cfg.objective.reference.mode == "lora_base"


def test_absolute_base(tmp_path):
    base = write(tmp_path / "b.yaml", "run: {name: b}\nmodel: {size: debug}\n")
    cfg = load_config(write(tmp_path / "sub" / "c.yaml", f"base: {base}\nrun: {{seed: 1}}\n"))
    assert (cfg.run.name, cfg.run.seed) == ("b", 1)


def test_inheritance_cycle(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    msg = errors_of(load_config, tmp_path / "a.yaml")
    assert "cycle" in msg and "a.yaml" in msg and "b.yaml" in msg


def test_missing_base_names_file(tmp_path):
    msg = errors_of(load_config, write(tmp_path / "a.yaml", "base: nope.yaml\n"))
    assert "nope.yaml" in msg and "a.yaml" in msg


def test_overrides_are_typed(tmp_path):
    path = write(tmp_path / "a.yaml", "run: {name: a}\nmodel: {size: 14B}\ncheckpoint: {load: /ckpt}\n")
    cfg = load_config(path, ["parallel.tp=2", "optim.lr=1e-5", "optim.betas=[0.8, 0.9]",
                             "checkpoint.load=null", "parallel.fsdp=true", "model.num_layers=4"])
    assert cfg.parallel.tp == 2 and cfg.optim.lr == 1e-5 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.checkpoint.load is None and cfg.parallel.fsdp is True and cfg.model.num_layers == 4


def test_parse_overrides_nests_and_later_wins():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "a.b=x"]) == {"a": {"b": "x", "c": [1, 2]}}
    assert "parallel.tp" in errors_of(parse_overrides, ["parallel.tp"])
    assert "=3" in errors_of(parse_overrides, ["=3"])


def test_exponent_floats_in_yaml(tmp_path):
    cfg = load_config(write(tmp_path / "a.yaml", "run: {name: a}\nmodel: {size: debug}\noptim: {lr: 3e-6}\n"))
    assert cfg.optim.lr == 3e-6


# ---------------------------------------------------------------- strictness


def test_unknown_nested_key_did_you_mean(tmp_path):
    path = write(tmp_path / "x.yaml", "run: {name: a}\nmodel: {size: 14B}\nparallel: {tpp: 2}\n")
    msg = errors_of(load_config, path)
    assert "unknown key 'parallel.tpp'" in msg and "x.yaml" in msg and "did you mean 'parallel.tp'?" in msg


def test_unknown_section_did_you_mean():
    msg = errors_of(from_dict, {**MINIMAL, "paralel": {"tp": 2}, "tp": 2})
    assert "unknown key 'paralel'; did you mean 'parallel'?" in msg
    assert "unknown key 'tp'; did you mean 'parallel.tp'?" in msg  # right key, wrong section


def test_unknown_key_points_at_inherited_file(tmp_path):
    write(tmp_path / "base.yaml", "run: {name: a}\nmodel: {size: 14B}\ndata: {frame: 81}\n")
    msg = errors_of(load_config, write(tmp_path / "child.yaml", "base: base.yaml\n"))
    assert "unknown key 'data.frame' in" in msg and "base.yaml" in msg and "'data.frames'" in msg


def test_wrong_type_message():
    msg = errors_of(make, parallel={"tp": "two"})
    assert "parallel.tp: expected int, got str 'two'" in msg
    msg = errors_of(with_overrides, make(), ["parallel.tp=two"])
    assert "parallel.tp: expected int, got str 'two'" in msg and "override 'parallel.tp=two'" in msg


@pytest.mark.parametrize("section,key,value,expected", [
    ("parallel", "tp", True, "int"),
    ("parallel", "fsdp", 1, "bool"),
    ("data", "frames", 81.0, "int"),
    ("optim", "lr", False, "float"),
    ("run", "name", None, "str"),
    ("optim", "betas", [0.9, "x"], "list of 2 float"),
    ("optim", "betas", [0.9, 0.9, 0.9], "list of 2 float"),
    ("lora", "targets", "linear_qkv", "list of str"),
    ("objective", "reference", "cached", "mapping"),
])
def test_strict_types(section, key, value, expected):
    assert f"{section}.{key}: expected {expected}" in errors_of(make, **{section: {key: value}})


def test_int_accepted_for_float_and_optional_null():
    cfg = make(optim={"lr": 1, "betas": [1, 0]}, parallel={"virtual_pp": None})
    assert type(cfg.optim.lr) is float and cfg.optim.betas == (1.0, 0.0)
    assert "int or null" in errors_of(make, parallel={"virtual_pp": "2"})


def test_literal_lists_options():
    msg = errors_of(make, model={"size": "7B"})
    assert "model.size" in msg and "'7B'" in msg and "'debug', '1.3B', '14B', '14B-i2v'" in msg
    assert "'t2v', 'i2v' or null" in errors_of(make, model={"task": "x2v"})


def test_missing_required():
    assert "missing required key 'run.name'" in errors_of(from_dict, {"run": {}, "model": {"size": "14B"}})
    assert "missing required key 'model'" in errors_of(from_dict, {"run": {"name": "a"}})


def test_all_type_errors_reported_together():
    msg = errors_of(make, parallel={"tp": "a", "pp": "b"}, data={"bogus": 1})
    assert len(msg.splitlines()) == 3


def test_frozen():
    cfg = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.parallel.tp = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run = None


def test_with_overrides_and_yaml_round_trip():
    cfg = make(lora={"rank": 8})
    new = with_overrides(cfg, ["parallel.tp=4", "lora.targets=[linear_qkv]"])
    assert new.parallel.tp == 4 and new.lora.targets == ("linear_qkv",) and new.lora.rank == 8
    assert cfg.parallel.tp == 1  # original untouched
    assert from_dict(yaml.safe_load(dump_yaml(new))) == new


# ---------------------------------------------------------------- validate


def test_valid_64_rank_layout():
    cfg = make(parallel={"tp": 2, "pp": 2, "cp": 4, "sequence_parallel": True},
               data={"global_batch_pairs": 8})
    layout = validate(cfg, 64, arch(layers=40, heads=40))
    assert isinstance(layout, Layout)
    assert (layout.tp, layout.pp, layout.cp, layout.dp) == (2, 2, 4, 4)
    assert layout.layers_per_stage == (20, 20)
    assert layout.latent_shape == (21, 60, 104) and layout.tokens == 21 * 30 * 52
    text = layout.describe()
    assert "TP=2 PP=2 CP=4 DP=4 (world 64)" in text and "stage 1: layers 20-39" in text


def test_layout_without_arch_and_interleaved_description():
    assert validate(make(), 1).layers_per_stage == ()
    # the trainer refuses parallel.virtual_pp (validate says so); the layout still describes interleaving
    layout = dataclasses.replace(validate(make(parallel={"pp": 2}), 2, arch(layers=8, heads=4)), virtual_pp=2)
    assert "stage 0: layers 0-1, 4-5" in layout.describe()


@pytest.mark.parametrize("mode,extra", [("lora_base", {"lora": {"rank": 4}}), ("resident", {}), ("cpu_swap", {}),
                                        ("cached", {})])
def test_every_reference_mode_runs_under_pipeline_parallelism(mode, extra):
    cfg = make(parallel={"pp": 2, "tp": 2}, objective={"reference": {"mode": mode}}, **extra)
    assert validate(cfg, 8, arch(layers=8, heads=4)).pp == 2


def test_the_trainer_and_the_planner_refuse_what_validate_refuses(tmp_path, capsys):
    """One list of refusals: train.py (dry run and start-up) and the capacity planner both go through it."""
    from megatron_regdpo.capacity.simulate import simulate_step
    from megatron_regdpo.train import main

    path = write(tmp_path / "r.yaml", "run: {name: r}\nmodel: {size: debug}\n")
    for overrides in (["parallel.pp=2", "parallel.virtual_pp=2"], ["checkpoint.async_save=true"]):
        world = "2" if "parallel.pp=2" in overrides else "1"
        capsys.readouterr()
        assert main(["--config", str(path), "--dry-run", "--world-size", world, *overrides]) == 2
        assert main(["--config", str(path), "--world-size", world, *overrides]) == 2  # start-up, before any group
        err = capsys.readouterr().err
        said = [line for line in err.splitlines() if line.startswith("invalid config:")]
        assert len(said) == 2 and all("not supported" in line for line in said), err  # one line each
        with pytest.raises(ConfigError, match="not supported"):
            simulate_step(with_overrides(load_config(path), overrides), int(world))


@pytest.mark.parametrize("sections,world,arch_kw,needle", [
    ({"parallel": {"tp": 2, "pp": 2}}, 6, None, "world size 6 is not divisible by tp*pp*cp = 4 (tp=2, pp=2, cp=1)"),
    ({"parallel": {"tp": 0}}, 1, None, "parallel.tp must be >= 1, got 0"),
    ({"parallel": {"tp": 5}}, 5, {"heads": 12}, "model heads 12 not divisible by parallel.tp=5"),
    ({"parallel": {"pp": 3}}, 3, {"layers": 40}, "model layers 40 not divisible by parallel.pp=3"),
    ({"parallel": {"pp": 2, "virtual_pp": 3}}, 2, {"layers": 40}, "parallel.virtual_pp=3 is not supported: the "
     "trainer builds one model chunk per pipeline stage"),
    ({"parallel": {"virtual_pp": 2}}, 1, None, "parallel.virtual_pp=2 is not supported"),
    ({"checkpoint": {"async_save": True}}, 1, None, "checkpoint.async_save=true is not supported yet"),
    ({"data": {"frames": 80}}, 1, None, "data.frames=80 must be 4k+1"),
    ({"data": {"height": 488}}, 1, None, "data.height=488 must be a positive multiple of 16"),
    ({"parallel": {"cp": 16}, "data": {"global_batch_pairs": 16}}, 16, None,
     "video tokens 32760 = 21 latent frames x 30 x 52 patches"),
    ({"parallel": {"sequence_parallel": True}}, 1, None, "sequence_parallel requires parallel.tp > 1"),
    ({"parallel": {"tp": 16, "sequence_parallel": True}, "data": {"frames": 5, "height": 16, "width": 16}},
     16, None, "not divisible by tp*cp = 16"),
    ({"data": {"global_batch_pairs": 6, "micro_batch_pairs": 2}}, 2, None, "= 4 (dp=2, micro=2)"),
    ({"precision": {"fp8": "delayed"}}, 1, None, "requires model.backend='te'"),
    ({"precision": {"fp8": "current", "params_dtype": "fp32"}, "model": {"backend": "te"}}, 1, None,
     "params_dtype='fp32'"),
    ({"parallel": {"fsdp": True, "distributed_optimizer": True}}, 1, None, "mutually exclusive"),
    ({"parallel": {"fsdp": True}, "objective": {"reference": {"mode": "cpu_swap"}}}, 1, None,
     "'cpu_swap' swaps whole weights"),
    ({"lora": {"rank": -1}}, 1, None, "lora.rank must be >= 0"),
    ({"lora": {"rank": 4, "alpha": 0}}, 1, None, "lora.alpha must be > 0"),
    ({"objective": {"reference": {"mode": "lora_base"}}}, 1, None, "needs LoRA (lora.rank > 0), got rank=0"),
    ({"optim": {"lr": 0}}, 1, None, "optim.lr must be > 0, got 0.0"),
    ({"schedule": {"warmup_steps": 200}}, 1, None, "warmup_steps=200 exceeds train_steps=100"),
    ({"checkpoint": {"keep": 0}}, 1, None, "checkpoint.keep must be >= 1, got 0"),
    ({"objective": {"beta": -1}}, 1, None, "objective.beta must be > 0, got -1.0"),
])
def test_each_check(sections, world, arch_kw, needle):
    cfg = make(**sections)
    msg = errors_of(validate, cfg, world, arch(**arch_kw) if arch_kw is not None else None)
    assert needle in msg
    assert len(msg.splitlines()) == 1, msg  # each check fires alone


def test_all_failures_reported_together():
    cfg = make(parallel={"tp": 5, "sequence_parallel": False, "fsdp": True, "distributed_optimizer": True},
               data={"frames": 80}, optim={"lr": -1}, checkpoint={"keep": 0})
    with pytest.raises(ConfigError) as info:
        validate(cfg, 6, arch(heads=12))
    lines = info.value.errors
    assert len(lines) == 6 and len(str(info.value).splitlines()) == 6
    assert any("world size 6" in line for line in lines) and any("heads 12" in line for line in lines)


def test_from_checkpoint_reads_checkpoint_load_and_explicit_fields_must_agree(tmp_path):
    """model.size=from_checkpoint is the architecture in checkpoint.load/model.json (issue 14)."""
    import json

    from megatron_regdpo.models.wan.arch import SIZES, resolve_arch

    arch = dataclasses.replace(SIZES["debug"], num_heads=2, head_dim=32)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "model.json").write_text(json.dumps({"family": "wan2.1", "arch": dataclasses.asdict(arch)}))
    cfg = from_dict({**MINIMAL, "model": {"size": "from_checkpoint"}, "checkpoint": {"load": str(tmp_path / "ck")}})
    assert cfg.model.arch_from == str(tmp_path / "ck") and resolve_arch(cfg.model) == arch
    assert with_overrides(cfg, ["run.seed=1"]).model == cfg.model            # survives a round trip
    msg = errors_of(resolve_arch, with_overrides(cfg, ["model.num_heads=4"]).model)
    assert f"model.num_heads=4 but {tmp_path / 'ck' / 'model.json'} has num_heads=2" in msg
    assert "model.head_dim=16 (model.size='debug') but" in errors_of(resolve_arch, from_dict(MINIMAL).model,
                                                                       tmp_path / "ck")
    assert "needs checkpoint.load" in errors_of(from_dict, {**MINIMAL, "model": {"size": "from_checkpoint"}})
    assert "only read with model.size=from_checkpoint" in errors_of(
        from_dict, {**MINIMAL, "model": {"size": "debug", "arch_from": "/x"}})
