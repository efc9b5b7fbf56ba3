"""Our negatives are diffusers' Wan samples: from the same noise and embeddings, our sampler on our Megatron Wan
gives the latents of WanPipeline / WanImageToVideoPipeline (output_type="latent") on diffusers' transformer
with the same (small, random) weights, for UniPC and FlowMatchEuler, T2V and I2V, few and many steps.

Everything is real and small: the tiny random VAE, text and CLIP encoders of data/encode (tiny_paths), a
random WanTransformer3DModel converted to ours through the conversion rules, Wan's scheduler_config.json
written into a diffusers-style folder and read back by FlowScheduler.read.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from megatron_regdpo.checkpoint_io.engine import to_ours
from megatron_regdpo.data.negatives import FlowScheduler, guided_velocity, sample
from megatron_regdpo.models.wan.arch import SIZES
from megatron_regdpo.models.wan.build import build_wan
from megatron_regdpo.models.wan.mapping import wan_rules

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5                 # relative L2 of the final latents, fp32
FRAMES, SIZE = 5, 32       # pixels: 5 frames of 32 x 32 -> latents 16 x 2 x 4 x 4
I2V_TEXT_LEN = 512         # diffusers' I2V attention takes the text as the last 512 context tokens
GUIDANCE = 5.0
WAN_SCHEDULER = dict(      # Wan2.1-*-Diffusers/scheduler/scheduler_config.json
    prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0,
    solver_order=2, solver_type="bh2", lower_order_final=True, predict_x0=True, final_sigmas_type="zero")
ARCHS = {"t2v": SIZES["debug"],
         "i2v": dataclasses.replace(SIZES["debug"], in_channels=36, image_dim=32)}  # tiny CLIP width 32


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def models(pg):
    """Per task: diffusers' transformer with non-trivial random weights and ours with the same weights."""
    out = {}
    for task, arch in ARCHS.items():
        torch.manual_seed(1)
        ref = diffusers.WanTransformer3DModel(**arch.diffusers_config()).float().eval()
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.05 * torch.randn_like(p))
        ours = build_wan(arch, pg, backend="local", params_dtype=torch.float32)
        ours.load_state_dict(dict(to_ours(wan_rules(arch), ref.state_dict().__getitem__, arch.num_heads)),
                             strict=False)
        out[task] = (ref, ours.eval())
    return out


@pytest.fixture(scope="module")
def pipes(models, tiny_paths, tmp_path_factory):
    """(T2V pipeline, I2V pipeline, the Wan-style folder holding scheduler/scheduler_config.json)."""
    from transformers import AutoTokenizer, CLIPVisionModel, UMT5EncoderModel

    from megatron_regdpo.data.encode.image import _processor_class

    folder = tmp_path_factory.mktemp("wan_diffusers")
    diffusers.UniPCMultistepScheduler(**WAN_SCHEDULER).save_pretrained(folder / "scheduler")
    common = dict(tokenizer=AutoTokenizer.from_pretrained(tiny_paths.tokenizer),
                  text_encoder=UMT5EncoderModel.from_pretrained(tiny_paths.text_encoder),
                  vae=diffusers.AutoencoderKLWan.from_pretrained(tiny_paths.vae),
                  scheduler=diffusers.UniPCMultistepScheduler.from_pretrained(folder / "scheduler"))
    t2v = diffusers.WanPipeline(transformer=models["t2v"][0], **common)
    i2v = diffusers.WanImageToVideoPipeline(
        transformer=models["i2v"][0], image_encoder=CLIPVisionModel.from_pretrained(tiny_paths.image_encoder),
        image_processor=_processor_class().from_pretrained(tiny_paths.image_processor), **common)
    for p in (t2v, i2v):
        p.set_progress_bar_config(disable=True)
    return t2v, i2v, folder


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 7.3])
def test_grids_and_timesteps_are_the_schedulers(shift):
    """sigmas and the timesteps the pipeline feeds the transformer: equal values and dtypes (UniPC: int64,
    truncated; Euler: float32, its shift applied twice at the low end)."""
    for ref in (diffusers.UniPCMultistepScheduler(**{**WAN_SCHEDULER, "flow_shift": shift}),
                diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)):
        cls = type(ref)
        ours = FlowScheduler.from_config({**ref.config, "_class_name": cls.__name__})
        for steps in (1, 2, 4, 10, 37, 50):
            ref.set_timesteps(steps)
            sch = ours.schedule(steps)
            for a, b in ((sch.sigmas, ref.sigmas), (sch.timesteps, ref.timesteps)):
                assert a.dtype == b.dtype and torch.equal(a, b), (cls.__name__, steps, a, b)


def test_scheduler_configs_read_and_refused(pipes, tmp_path):
    import json

    _, _, folder = pipes
    for path in (folder, folder / "scheduler", folder / "scheduler" / "scheduler_config.json"):
        assert FlowScheduler.read(path) == FlowScheduler(kind="unipc", shift=3.0)
    assert FlowScheduler.read(folder, "euler", 5.0) == FlowScheduler(kind="euler", shift=5.0)
    with pytest.raises(ValueError, match="no scheduler/scheduler_config.json"):
        FlowScheduler.read(tmp_path)
    karras = {**json.loads((folder / "scheduler" / "scheduler_config.json").read_text()), "use_karras_sigmas": True}
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        FlowScheduler.from_config(karras)
    with pytest.raises(ValueError, match="DDIMScheduler"):
        FlowScheduler.from_config({"_class_name": "DDIMScheduler"})


def test_generate_flags():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "tools" / "make_gt_pairs.py"
    spec = importlib.util.spec_from_file_location("make_gt_pairs_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = tool.parse_args(["generate", "--store", "s", "--random-debug", "--scheduler", "wan", "--solver", "euler"])
    assert (args.scheduler, args.solver, args.shift, args.cfg_batch) == ("wan", "euler", None, True)
    assert not tool.parse_args(["generate", "--store", "s", "--random-debug", "--no-cfg-batch"]).cfg_batch


def _inputs(task: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text_len = I2V_TEXT_LEN if task == "i2v" else 16
    text, neg = (torch.randn(text_len, 32, generator=g) for _ in range(2))
    noise = torch.randn(1, 16, 2, SIZE // 8, SIZE // 8, generator=g)
    image = (torch.rand(SIZE, SIZE, 3, generator=g) * 255).to(torch.uint8).numpy()
    return text, neg, noise, image


def _first_frame(image_HWC: np.ndarray) -> torch.Tensor:
    """The frame in [-1, 1], [1, 3, H, W], as the pipeline's video processor makes it from the image."""
    return (torch.from_numpy(image_HWC).float().div(255) * 2 - 1).permute(2, 0, 1)[None]


def _ours_condition(pipe, image_HWC):
    """Our I2V conditioning (data/encode on the pipeline's own VAE and CLIP): (cond [20, F, h, w], CLIP [I, E])."""
    from megatron_regdpo.data.encode import ImageEncoder, WanVAE

    frame = _first_frame(image_HWC)
    cond = WanVAE(pipe.vae).i2v_condition(frame, FRAMES)[0]
    clip = ImageEncoder(pipe.image_encoder, pipe.image_processor).encode(frame)[0]
    return cond, clip


def _diffusers(pipe, task, steps, text, neg, noise, image):
    from PIL import Image

    kwargs = dict(prompt_embeds=text[None], negative_prompt_embeds=neg[None], latents=noise.clone(),
                  num_inference_steps=steps, guidance_scale=GUIDANCE, height=SIZE, width=SIZE, num_frames=FRAMES,
                  output_type="latent", return_dict=False)
    if task == "i2v":
        kwargs["image"] = Image.fromarray(image)
    return pipe(**kwargs)[0]


def _ours(model, task, scheduler, steps, text, neg, noise, cond, cfg_batch=True):
    velocity = guided_velocity(model, text, neg, cond, torch.float32, GUIDANCE, cfg_batch)
    return sample(velocity, noise, scheduler.schedule(steps))


@pytest.mark.parametrize("task", ["t2v", "i2v"])
@pytest.mark.parametrize("solver", ["unipc", "euler"])
@pytest.mark.parametrize("steps", [4, 50])
@torch.no_grad()
def test_final_latents_equal_the_diffusers_pipeline(models, pipes, task, solver, steps):
    t2v, i2v, folder = pipes
    pipe = t2v if task == "t2v" else i2v
    scheduler = FlowScheduler.read(folder, kind=solver)
    assert scheduler.shift == 3.0 and scheduler.kind == solver
    saved = pipe.scheduler
    if solver == "euler":  # what a user swaps in for Euler, with Wan's shift
        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    text, neg, noise, image = _inputs(task)
    try:
        ref = _diffusers(pipe, task, steps, text, neg, noise, image)
    finally:
        pipe.scheduler = saved
    cond = _ours_condition(pipe, image) if task == "i2v" else None
    ours = _ours(models[task][1], task, scheduler, steps, text, neg, noise, cond)
    err = rel_l2(ours, ref)
    print(f"{task} {solver} {steps} steps: relative L2 {err:.2e}, max |diff| {(ours - ref).abs().max():.2e}")
    assert ours.shape == ref.shape and ref.abs().max() > 0.1
    assert err < TOL


@torch.no_grad()
def test_i2v_condition_and_clip_tokens_are_the_pipelines(pipes):
    """data/encode's first-frame condition (mask channels + VAE latents) and CLIP tokens equal the pipeline's."""
    _, i2v, _ = pipes
    from PIL import Image

    _, _, noise, image = _inputs("i2v")
    cond, clip = _ours_condition(i2v, image)
    frame = i2v.video_processor.preprocess(Image.fromarray(image), height=SIZE, width=SIZE)
    assert torch.equal(frame, _first_frame(image))
    _, ref_cond = i2v.prepare_latents(frame, 1, 16, SIZE, SIZE, FRAMES, torch.float32, "cpu", None, noise)
    assert torch.equal(cond[:4], ref_cond[0, :4])                     # the 4 mask channels, exactly
    assert rel_l2(cond[4:], ref_cond[0, 4:]) < 1e-6                    # (z - mean) / std vs (z - mean) * (1/std)
    assert rel_l2(clip, i2v.encode_image(Image.fromarray(image), "cpu")[0]) < 1e-6


@pytest.mark.parametrize("task", ["t2v", "i2v"])
@torch.no_grad()
def test_cfg_in_one_batch_equals_two_forwards(models, pipes, task):
    """One forward of [x; x] with [text; negative] gives each pass's numbers to fp32 rounding (< 1e-6; what is
    left is the GEMM's batch-size-dependent summation order, also seen between batch 1 and 2). The guided
    v_u + g (v_c - v_u) then carries up to (2g - 1) = 9x that rounding relative to itself when the passes
    are close (a random model barely reads the text), so it and the sampled latents get (2g - 1) x 1e-6."""
    from megatron_regdpo.data.negatives.generate import _velocity_fn

    _, i2v, folder = pipes
    model = models[task][1]
    text, neg, noise, image = _inputs(task, seed=3)
    cond = _ours_condition(i2v, image) if task == "i2v" else None
    x = torch.cat([noise, torch.randn_like(noise)])                    # K = 2 negatives at once
    t = torch.tensor(700, dtype=torch.int64)
    two = _velocity_fn(model, text, neg, cond, torch.float32)
    v_c, v_u = two(x, t, True), two(x, t, False)
    v_c1, v_u1 = _velocity_fn(model, torch.stack([text, neg]), None, cond, torch.float32)(
        torch.cat([x, x]), t, True).chunk(2)
    per_pass = max(rel_l2(v_c1, v_c), rel_l2(v_u1, v_u))
    tol = (2 * GUIDANCE - 1) * 1e-6
    one = guided_velocity(model, text, neg, cond, torch.float32, GUIDANCE, cfg_batch=True)(x, t)
    ref = guided_velocity(model, text, neg, cond, torch.float32, GUIDANCE, cfg_batch=False)(x, t)
    scheduler = FlowScheduler.read(folder)
    a = _ours(model, task, scheduler, 4, text, neg, x, cond, cfg_batch=True)
    b = _ours(model, task, scheduler, 4, text, neg, x, cond, cfg_batch=False)
    print(f"{task}: per pass {per_pass:.1e}, guided {rel_l2(one, ref):.1e}, 4 UniPC steps {rel_l2(a, b):.1e}")
    assert per_pass < 1e-6 and rel_l2(one, ref) < tol and rel_l2(a, b) < tol
