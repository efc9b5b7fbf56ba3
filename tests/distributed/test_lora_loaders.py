"""The exported LoRA adapter gives our output through every diffusers loader, from TP1 and TP2 checkpoints.

Per task (T2V, I2V): a small random Wan pipeline saved by diffusers, its transformer imported, adapters added
(rank 4, alpha 8: alpha != rank, so a loader that ignored the scale would be off), B random, saved at TP1;
two spawned gloo ranks load that checkpoint at TP2 and save it again (one spawn for both tasks). Each
checkpoint goes through `tools/convert_checkpoint.py export --adapter-out`; the adapter, loaded by
`transformer.load_lora_adapter(dir)`, `(file)`, `(file, use_safetensors=True)` and `pipe.load_lora_weights(dir)`
onto the base, gives (fp32, <= 1e-5 relative) our model's output with adapters on and the merged export's.
tests/unit/test_lora.py checks the file itself (names, metadata) on an in-memory TP1 model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("one_thread")]  # one_thread: tests/conftest.py
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft", reason="diffusers' LoRA loaders need the 'peft' package")

from megatron_regdpo.models.wan.arch import SIZES  # noqa: E402

TOL = 1e-5
RANK, ALPHA = 4, 8.0
ARCHS = {"t2v": SIZES["debug"], "i2v": dataclasses.replace(SIZES["debug"], in_channels=36, image_dim=32)}
LOADERS = {  # what a user types, with `dir` the --adapter-out folder and `file` the adapter file in it
    "transformer.load_lora_adapter(dir)": lambda tr, d, f: tr.load_lora_adapter(d),
    "transformer.load_lora_adapter(dir, use_safetensors=True)": lambda tr, d, f: tr.load_lora_adapter(
        d, use_safetensors=True),
    "transformer.load_lora_adapter(dir, weight_name=FILE)": lambda tr, d, f: tr.load_lora_adapter(
        d, weight_name=f.name),
    "transformer.load_lora_adapter(file)": lambda tr, d, f: tr.load_lora_adapter(f),
    "transformer.load_lora_adapter(file, use_safetensors=True)": lambda tr, d, f: tr.load_lora_adapter(
        f, use_safetensors=True),
    "pipe.load_lora_weights(dir)": None,
}
ROOT = Path(__file__).resolve().parents[2]


def resave_at_tp2(rank: int, world: int, payload: dict) -> None:
    """Each task's TP1 LoRA checkpoint loaded as TP2 shards and saved from them."""
    from megatron_regdpo.checkpoint_io.megatron_ckpt import load_model, read_meta, save_model
    from megatron_regdpo.models.lora import apply_lora
    from megatron_regdpo.models.wan.build import build_wan
    from megatron_regdpo.models.wan.convert import arch_from_meta
    from megatron_regdpo.parallel.groups import destroy_distributed, init_distributed

    pg = init_distributed(tp=2, rank=rank, world_size=world)
    par = SimpleNamespace(tp=2, pp=1, cp=1, sequence_parallel=False, virtual_pp=None)
    try:
        for src, dst in payload:
            meta = read_meta(src)
            model = build_wan(arch_from_meta(meta), pg, parallel=par, init_weights=False)
            apply_lora(model, meta["lora"]["rank"], meta["lora"]["alpha"], tuple(meta["lora"]["targets"]))
            assert model.decoder.layers[0].mlp.linear_fc1.lora_B.shape[0] == 2 * model.config.ffn_hidden_size // 4
            load_model(model, src)
            save_model(model, dst, meta)
    finally:
        destroy_distributed()


def _cli(argv) -> tuple[int, str, str]:
    spec = importlib.util.spec_from_file_location("convert_checkpoint_tool", ROOT / "tools" / "convert_checkpoint.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def exports(pg, tmp_path_factory):
    """task -> the base pipeline folder, our LoRA model's output ("ours"), and per checkpoint (tp1, tp2) the
    output of the CLI's merged export and its --adapter-out folder."""
    from _harness import run_world

    from megatron_regdpo.checkpoint_io.megatron_ckpt import save_model
    from megatron_regdpo.data.encode import tiny_models
    from megatron_regdpo.models.lora import apply_lora, lora_modules
    from megatron_regdpo.models.wan import convert
    from megatron_regdpo.models.wan.lora_export import checkpoint_meta
    from megatron_regdpo.models.wan.pipeline_export import save_random_pipeline

    root = tmp_path_factory.mktemp("lora_loaders")
    encoders = Path(tiny_models(root / "encoders").vae).parent
    out, resave = {}, []
    for i, (task, arch) in enumerate(ARCHS.items()):
        d = root / task
        save_random_pipeline(d / "base", arch, encoders, seed=10 + i)
        convert.import_diffusers(d / "base" / "transformer", d / "imported", pg)
        model, _ = convert.load_checkpoint(d / "imported", pg)
        apply_lora(model, RANK, ALPHA)
        g = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            for _, m in lora_modules(model):
                m.lora_B.copy_(0.2 * torch.randn(m.lora_B.shape, generator=g))
        save_model(model, d / "tp1", checkpoint_meta(model, arch))
        resave.append((str(d / "tp1"), str(d / "tp2")))
        out[task] = {"base": d / "base", "model": model.eval()}
    run_world(2, resave_at_tp2, resave)
    for task in ARCHS:
        d = root / task
        for src in ("tp1", "tp2"):
            rc, stdout, err = _cli(["export", "--ckpt", d / src, "--out", d / f"{src}-merged",
                                    "--adapter-out", d / f"{src}-adapter"])
            assert rc == 0 and "wrote the LoRA adapter" in stdout, err
            merged = _run(diffusers.WanTransformer3DModel.from_pretrained(str(d / f"{src}-merged")), task)
            out[task][src] = (merged, d / f"{src}-adapter")
        x, t, txt, img = _inputs(task)
        with torch.no_grad():
            out[task]["ours"] = out[task].pop("model")(x, t, txt, img)
        base = _run(diffusers.WanTransformer3DModel.from_pretrained(str(d / "base" / "transformer")), task)
        assert _rel(base, out[task]["ours"]) > 1e-2  # the adapters matter: a loader that dropped them would fail
    return out


def _inputs(task: str):
    from megatron_regdpo.models.wan.convert import random_inputs

    # diffusers' I2V attention takes the last 512 context tokens as the text
    return random_inputs(ARCHS[task], batch=1, latent=(2, 4, 4), text_len=512 if task == "i2v" else 16, seed=4)


def _run(transformer, task: str) -> torch.Tensor:
    x, t, txt, img = _inputs(task)
    with torch.no_grad():
        return transformer.eval()(x, t, txt, encoder_hidden_states_image=img, return_dict=False)[0]


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("source", ["tp1", "tp2"])
@pytest.mark.parametrize("task", list(ARCHS))
def test_adapter_loads_through(exports, task, source, loader):
    from megatron_regdpo.models.wan.lora_export import ADAPTER_FILE

    e = exports[task]
    merged, adapter_dir = e[source]
    if loader.startswith("pipe."):
        pipe = getattr(diffusers, "WanImageToVideoPipeline" if task == "i2v" else "WanPipeline").from_pretrained(
            str(e["base"]))
        pipe.load_lora_weights(str(adapter_dir))
        transformer = pipe.transformer
    else:
        transformer = diffusers.WanTransformer3DModel.from_pretrained(str(e["base"] / "transformer"))
        # diffusers (0.42) reads a folder given alone as pytorch_lora_weights.bin: the export writes both files
        LOADERS[loader](transformer, str(adapter_dir), adapter_dir / ADAPTER_FILE)
    got, ours = _run(transformer, task), e["ours"]
    assert _rel(got, ours) < TOL, f"vs our model: {_rel(got, ours):.2e}"
    assert _rel(got, merged) < TOL, f"vs the merged export: {_rel(got, merged):.2e}"
