"""`tools/convert_checkpoint.py export --pipeline-from WAN_DIR`: a whole diffusers pipeline folder out.

The base pipelines are small random WanPipeline / WanImageToVideoPipeline saved by diffusers itself (tiny
VAE, UMT5 and CLIP of data/encode). The checkpoint is the base transformer imported, with LoRA adapters
(rank 4, alpha 8, random B) so that the exported transformer differs from the base's. The exported folder
loads with from_pretrained, its transformer gives our model's output, and two sampling steps give the
latents of the base pipeline with only the transformer swapped. Every refusal writes nothing.
"""
from __future__ import annotations

import dataclasses
import filecmp
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_regdpo.checkpoint_io.megatron_ckpt import save_model
from megatron_regdpo.models.lora import apply_lora, lora_modules
from megatron_regdpo.models.wan import convert
from megatron_regdpo.models.wan.arch import SIZES
from megatron_regdpo.models.wan.lora_export import checkpoint_meta
from megatron_regdpo.models.wan.pipeline_export import PIPELINES, save_random_pipeline

diffusers = pytest.importorskip("diffusers")
_spec = importlib.util.spec_from_file_location("convert_checkpoint_tool",
                                               Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

TOL = 1e-5
ARCHS = {"t2v": SIZES["debug"], "i2v": dataclasses.replace(SIZES["debug"], in_channels=36, image_dim=32)}
LINK = {"t2v": False, "i2v": True}
SIZE, FRAMES = 32, 5  # -> latents 16 x 2 x 4 x 4


def _cli(argv) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _lora_checkpoint(base: Path, ckpt: Path, pg, root: Path):
    """The base pipeline's transformer imported, adapters added (random B), saved; returns our model."""
    convert.import_diffusers(base / "transformer", root / "imported", pg)
    model, arch = convert.load_checkpoint(root / "imported", pg)
    apply_lora(model, 4, 8.0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.copy_(0.2 * torch.randn(m.lora_B.shape, generator=g))
    save_model(model, ckpt, checkpoint_meta(model, arch))
    return model.eval()


@pytest.fixture(scope="module")
def cases(pg, tmp_path_factory):
    from megatron_regdpo.data.encode import tiny_models

    root = tmp_path_factory.mktemp("pipeline_export")
    encoders = tiny_models(root / "encoders")
    out = {}
    for i, (task, arch) in enumerate(ARCHS.items()):
        base, ckpt, exported = root / task / "base", root / task / "ckpt", root / task / "pipeline"
        save_random_pipeline(base, arch, Path(encoders.vae).parent, seed=i + 1)
        model = _lora_checkpoint(base, ckpt, pg, root / task)
        argv = ["export", "--ckpt", ckpt, "--out", exported, "--pipeline-from", base, "--verify",
                "--adapter-out", root / task / "adapter"]
        out[task] = dict(base=base, ckpt=ckpt, out=exported, model=model, adapter=root / task / "adapter",
                         run=_cli(argv + ["--link"] * LINK[task]))
    return out


def _sample(pipe, task: str, seed: int = 0) -> torch.Tensor:
    """Two steps from fixed noise and embeddings (no tokenizer: the prompt cleaner needs ftfy)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    text_len = 512 if task == "i2v" else 16  # diffusers' I2V takes the last 512 context tokens as the text
    kw = dict(prompt_embeds=torch.randn(1, text_len, 32, generator=g),
              negative_prompt_embeds=torch.randn(1, text_len, 32, generator=g),
              latents=torch.randn(1, 16, 2, SIZE // 8, SIZE // 8, generator=g), height=SIZE, width=SIZE,
              num_frames=FRAMES, num_inference_steps=2, output_type="latent", return_dict=False)
    if task == "i2v":
        kw["image"] = Image.fromarray((torch.rand(SIZE, SIZE, 3, generator=g) * 255).to(torch.uint8).numpy())
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(**kw)[0]


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("task", list(ARCHS))
def test_exported_pipeline_loads_and_runs(cases, task):
    c = cases[task]
    rc, out, err = c["run"]
    assert rc == 0, err
    assert "-> OK" in out and f"pipeline from {c['base']}" in out
    assert not c["out"].with_name(c["out"].name + ".partial").exists()
    assert filecmp.cmp(c["base"] / "model_index.json", c["out"] / "model_index.json", shallow=False)
    others = ["vae", "text_encoder", "tokenizer", "scheduler"] + (["image_encoder", "image_processor"]
                                                                  if task == "i2v" else [])
    assert sorted(p.name for p in c["out"].iterdir()) == sorted(others + ["transformer", "model_index.json"])
    assert not (c["out"] / "transformer").is_symlink()
    for name in others:
        assert (c["out"] / name).is_symlink() == LINK[task], name
        if LINK[task]:
            assert (c["out"] / name).resolve() == (c["base"] / name).resolve()
        else:
            cmp = filecmp.dircmp(c["base"] / name, c["out"] / name)
            assert not (cmp.left_only or cmp.right_only or cmp.diff_files), name

    cls = getattr(diffusers, PIPELINES[task])
    pipe = cls.from_pretrained(str(c["out"]))
    assert type(pipe) is cls
    x, t, txt, img = convert.random_inputs(ARCHS[task], batch=1, latent=(2, 4, 4), seed=2)
    with torch.no_grad():  # the pipeline's transformer is our LoRA model, merged
        want = c["model"](x, t, txt, img)
        got = pipe.transformer(x, t, txt, encoder_hidden_states_image=img, return_dict=False)[0]
    assert _rel(got, want) < TOL

    base = cls.from_pretrained(str(c["base"]))
    base_latents = _sample(base, task)
    base.transformer = diffusers.WanTransformer3DModel.from_pretrained(str(c["out"] / "transformer"))
    latents = _sample(pipe, task)
    assert latents.shape == (1, 16, 2, SIZE // 8, SIZE // 8)
    assert _rel(latents, _sample(base, task)) < TOL   # everything but the transformer is the base's
    assert _rel(latents, base_latents) > 1e-3          # and the transformer is not


@pytest.mark.parametrize("task", list(ARCHS))
def test_base_pipeline_with_the_adapter_samples_like_the_exported_pipeline(cases, task):
    """--adapter-out beside --pipeline-from: the user's base pipeline + pipe.load_lora_weights(adapter) samples
    what the exported (merged) pipeline samples."""
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs the 'peft' package")
    c = cases[task]
    assert c["run"][0] == 0, c["run"][2]
    cls = getattr(diffusers, PIPELINES[task])
    base = cls.from_pretrained(str(c["base"]))
    base.load_lora_weights(str(c["adapter"]))
    assert _rel(_sample(base, task), _sample(cls.from_pretrained(str(c["out"])), task)) < TOL


# --------------------------------------------------------------------------- refusals: exit 2, nothing written

def _edited_copy(src: Path, dst: Path, rel: str, edit) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    path = dst / rel
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return dst


def _refused(argv, out: Path, *needles):
    rc, stdout, err = _cli(argv)
    assert rc == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, (rc, err)
    for n in needles:
        assert str(n) in err, err
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_refuses_a_transformer_config_that_differs(cases, tmp_path):
    c = cases["t2v"]
    base = _edited_copy(c["base"], tmp_path / "base", "transformer/config.json", lambda d: {**d, "ffn_dim": 96})
    _refused(["export", "--ckpt", c["ckpt"], "--out", tmp_path / "o", "--pipeline-from", base],
             tmp_path / "o", base / "transformer" / "config.json", "ffn_dim=96", "ffn_dim=128")


@pytest.mark.parametrize("ckpt_task,base_task", [("i2v", "t2v"), ("t2v", "i2v")])
def test_refuses_the_other_task(cases, tmp_path, ckpt_task, base_task):
    _refused(["export", "--ckpt", cases[ckpt_task]["ckpt"], "--out", tmp_path / "o", "--pipeline-from",
              cases[base_task]["base"]], tmp_path / "o", PIPELINES[base_task], f"checkpoint is {ckpt_task.upper()}")


def test_refuses_a_folder_that_is_not_a_pipeline(cases, tmp_path):
    c = cases["t2v"]
    _refused(["export", "--ckpt", c["ckpt"], "--out", tmp_path / "o", "--pipeline-from", c["base"] / "transformer"],
             tmp_path / "o", c["base"] / "transformer" / "model_index.json", "not a diffusers pipeline folder")


def test_refuses_a_pipeline_that_is_not_wan(cases, tmp_path):
    c = cases["t2v"]
    base = _edited_copy(c["base"], tmp_path / "base", "model_index.json",
                        lambda d: {**d, "_class_name": "StableDiffusionPipeline"})
    _refused(["export", "--ckpt", c["ckpt"], "--out", tmp_path / "o", "--pipeline-from", base],
             tmp_path / "o", "_class_name='StableDiffusionPipeline'", "WanPipeline")


def test_refuses_a_two_expert_pipeline(cases, tmp_path):
    c = cases["t2v"]
    base = _edited_copy(c["base"], tmp_path / "base", "model_index.json",
                        lambda d: {**d, "transformer_2": ["diffusers", "WanTransformer3DModel"]})
    _refused(["export", "--ckpt", c["ckpt"], "--out", tmp_path / "o", "--pipeline-from", base],
             tmp_path / "o", "transformer_2", "Wan2.2")


def test_refuses_a_missing_component(cases, tmp_path):
    c = cases["i2v"]
    base = tmp_path / "base"
    shutil.copytree(c["base"], base)
    shutil.rmtree(base / "image_encoder")
    _refused(["export", "--ckpt", c["ckpt"], "--out", tmp_path / "o", "--pipeline-from", base],
             tmp_path / "o", "'image_encoder'", base / "image_encoder")


def test_refuses_a_non_empty_out(cases, tmp_path):
    c = cases["t2v"]
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = _cli(["export", "--ckpt", c["ckpt"], "--out", out, "--pipeline-from", c["base"]])
    assert rc == 2 and err.startswith("error:") and str(out) in err and "not empty" in err, err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert not out.with_name("o.partial").exists()


def test_link_needs_pipeline_from(cases, tmp_path):
    _refused(["export", "--ckpt", cases["t2v"]["ckpt"], "--out", tmp_path / "o", "--link"], tmp_path / "o",
             "--link", "--pipeline-from")
