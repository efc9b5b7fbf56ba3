"""The frozen encoders against diffusers' own Wan pipelines: VAE normalisation, I2V condition, T5 padding, CLIP."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from megatron_regdpo.data.encode import ModelPaths, tiny_models


def test_vae_latents_are_normalised_with_the_vae_statistics(encoders):
    vae = encoders.vae
    video_BCTHW = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    z = vae.vae.encode(video_BCTHW).latent_dist.mode()
    mean = torch.tensor(vae.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.vae.config.latents_std).view(1, -1, 1, 1, 1)
    out = vae.encode(video_BCTHW)
    assert out.shape == (1, 16, 3, 4, 4) == (1, *vae.latent_shape(9, 32, 32))
    torch.testing.assert_close(out, (z - mean) / std)


def test_i2v_condition_matches_diffusers_prepare_latents(encoders):
    from diffusers import WanImageToVideoPipeline

    vae = encoders.vae
    image_BCHW = torch.rand(1, 3, 32, 32) * 2 - 1
    pipe = SimpleNamespace(vae=vae.vae, vae_scale_factor_temporal=4, vae_scale_factor_spatial=8,
                           config=SimpleNamespace(expand_timesteps=False))
    _, theirs = WanImageToVideoPipeline.prepare_latents(pipe, image_BCHW, 1, 16, 32, 32, 9, torch.float32, "cpu",
                                                        None, latents=torch.zeros(1, 16, 3, 4, 4))
    ours = vae.i2v_condition(image_BCHW, 9)
    assert ours.shape == (1, 20, 3, 4, 4)
    torch.testing.assert_close(ours, theirs)
    assert ours[0, :4, 0].eq(1).all() and ours[0, :4, 1:].eq(0).all()   # the mask: first latent frame only


def test_text_embeddings_match_wan_and_are_zero_beyond_the_tokens(encoders):
    from diffusers import WanPipeline

    text = encoders.text
    captions = ["A red ball rolls   over &amp; the grass.", "short"]
    emb_BTE, mask_BT = text.encode(captions)
    assert emb_BTE.shape == (2, 64, 32) and mask_BT.dtype == torch.bool
    n = mask_BT.sum(1)
    assert n.tolist() == [len(text.tokenizer(c).input_ids) for c in ["a red ball rolls over & the grass.", "short"]]
    for b in range(2):
        assert emb_BTE[b, n[b]:].eq(0).all() and emb_BTE[b, : n[b]].abs().sum(-1).gt(0).all()
    pipe = SimpleNamespace(tokenizer=text.tokenizer, text_encoder=text.model, _execution_device="cpu")
    theirs = WanPipeline._get_t5_prompt_embeds(pipe, captions, max_sequence_length=64, dtype=torch.float32)
    torch.testing.assert_close(emb_BTE, theirs)


def test_clip_embedding_is_the_penultimate_layer(encoders):
    image = encoders.image
    frame_BCHW = torch.rand(2, 3, 64, 48) * 2 - 1
    out = image.encode(frame_BCHW)
    assert out.shape == (2, 257, 32) and image.tokens == 257
    pixels = image.processor(images=list(((frame_BCHW + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()),
                             return_tensors="pt").pixel_values
    torch.testing.assert_close(out, image.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2])


def test_tiny_models_are_built_once_and_reused(tiny_paths):
    folder = Path(tiny_paths.vae).parent
    stamp = (folder / "vae" / "config.json").stat().st_mtime_ns
    again = tiny_models(folder)
    assert again == tiny_paths and (folder / "vae" / "config.json").stat().st_mtime_ns == stamp
    assert ModelPaths.read(folder) == tiny_paths
