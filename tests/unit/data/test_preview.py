"""Previews: winners and losers decoded with the store's (tiny random) VAE into side-by-side mp4 files,
read back with PyAV; the VAE's decode; a rerun and the folders it refuses."""
from __future__ import annotations

import itertools
import json
import re
import shutil

import numpy as np
import pytest
import torch

from megatron_regdpo.data.decode.synth import encoder_for, frame_pattern
from megatron_regdpo.data.encode import WanVAE
from megatron_regdpo.data.preview import MPEG4, SEPARATOR, preview_encoder, write_previews, write_video
from megatron_regdpo.data.store import GTPairStore, prompt_id, safe_id

NEGATIVES = {0: ("genA", 0), 1: ("genA", 1)}, {0: ("genA", 0), 1: ("gen/B", 0)}  # per real clip: two negatives
TOLERANCE = 12.0  # mean abs difference (of 255) per pixel after lossy yuv420p H.264 (or mpeg4)


def make_store(root, vae, task="t2v", reals=("clip_a", "clip_b"), negatives=NEGATIVES, finalize=True):
    """A store of real clips (synthetic frames through the tiny VAE) and negatives of random latents."""
    attrs = {"task": task, "fps": 8, "frames": 9, "short_side": 64, "bucket": "1:1", "latent_dtype": "bf16",
             "text_len": 16, "vae": vae.describe()}
    store = GTPairStore.open_or_create(root / "s.zarr", attrs)
    torch.manual_seed(0)
    for i, (real_id, negs) in enumerate(itertools.zip_longest(reals, negatives[:len(reals)], fillvalue={})):
        caption = f"a clip called {real_id}"
        store.write_text(prompt_id(caption), torch.randn(16, 32), torch.arange(16) < 5, caption)
        video = torch.from_numpy(np.stack([frame_pattern(i + t, 64, 64) for t in range(9)]))
        video_BCTHW = (video.permute(3, 0, 1, 2)[None].float() / 127.5 - 1)
        latents_CFhw = vae.encode(video_BCTHW)[0]
        image = {} if task == "t2v" else {"image_IE": torch.randn(257, 32),
                                          "cond_CFhw": vae.i2v_condition(video_BCTHW[:, :, 0], 9)[0]}
        store.write_real(real_id, latents_CFhw, {"prompt_id": prompt_id(caption), "size": [64, 64]}, **image)
        for generator, k in negs.values():
            store.write_generated(f"{real_id}.{safe_id(generator)}.{k}", torch.randn(latents_CFhw.shape),
                                  {"real_id": real_id, "generator": generator, "k": k})
    if finalize:
        store.finalize()
    return store


@pytest.fixture(scope="module")
def vae(tiny_paths):
    """The tiny VAE with its last decoder layer rescaled to pictures of mean 0 and std 0.4 per channel: its random
    pictures are a flat dark grey, where any tolerance for lossy video would pass a swapped or misplaced clip."""
    vae = WanVAE.load(tiny_paths.vae)
    torch.manual_seed(0)
    pixels = vae.decode(torch.randn(1, 16, 3, 8, 8))
    mean_C, scale_C = pixels.mean((0, 2, 3, 4)), 0.4 / pixels.std((0, 2, 3, 4))
    conv = vae.vae.decoder.conv_out
    with torch.no_grad():
        conv.weight.mul_(scale_C.view(-1, *[1] * (conv.weight.dim() - 1)))
        conv.bias.copy_((conv.bias - mean_C) * scale_C)
    return vae


@pytest.fixture(scope="module")
def store(tmp_path_factory, vae):
    return make_store(tmp_path_factory.mktemp("preview"), vae)


def read_video(path):
    import av

    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(stream)])
        return stream.codec_context.name, float(stream.average_rate), frames


def decoded(vae, store, kind, key) -> np.ndarray:
    """uint8 [T, H, W, 3]: what the preview should show for one clip."""
    pixels = vae.decode(store.read_latents(kind, key)[None])[0]
    return ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).numpy()


def mad(a: np.ndarray, b: np.ndarray, block: int = 1) -> float:
    """Mean absolute difference of [T, H, W, 3] frames, after averaging `block` x `block` pixel squares."""
    def pool(x):
        t, h, w, c = x.shape
        return x.astype(np.float32).reshape(t, h // block, block, w // block, block, c).mean((2, 4))
    return float(np.abs(pool(a) - pool(b)).mean())


def test_vae_decode_is_encodes_inverse_in_shape_and_range(vae):
    x = torch.rand(2, 3, 9, 32, 48) * 2 - 1
    z = vae.encode(x)
    pixels = vae.decode(z)
    assert z.shape == (2, 16, 3, 4, 6) and pixels.shape == x.shape and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.std() > 0
    raw = vae.vae.decode(z * vae.std_C.view(1, -1, 1, 1, 1) + vae.mean_C.view(1, -1, 1, 1, 1)).sample
    torch.testing.assert_close(pixels, raw.clamp(-1, 1))              # it un-normalises what encode normalised
    with pytest.raises(ValueError, match=r"latents of shape \[16, 3, 4, 6\], want \[B, 16, F, h, w\]"):
        vae.decode(z[0])


def test_previews_show_the_winner_left_and_the_loser_right(store, vae, tmp_path):
    result = write_previews(store, tmp_path / "out", n=3, vae=vae)
    # the first negative of every clip (in index order: "gen/B" < "genA"), then the second: many clips
    assert [p.name for p in result.files] == ["clip_a__genA_0.mp4", "clip_b__gen__B_0.mp4", "clip_a__genA_1.mp4"]
    assert result.pairs_in_store == 4 and result.encoder == (encoder_for("h264") or MPEG4)[0]
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [p["file"] for p in index["previews"]] == [p.name for p in result.files] and index["fps"] == 8
    for path, entry in zip(result.files, index["previews"]):
        codec, fps, frames = read_video(path)
        real, loser = decoded(vae, store, "real", entry["real_id"]), decoded(vae, store, "generated",
                                                                           entry["generated_id"])
        assert codec == ("h264" if encoder_for("h264") else "mpeg4") and fps == 8
        assert frames.shape == (9, 64, 2 * 64 + SEPARATOR, 3) and real.shape == (9, 64, 64, 3)
        left, right = frames[:, :, :64], frames[:, :, 64 + SEPARATOR:]
        assert mad(left, real) < TOLERANCE and mad(right, loser) < TOLERANCE
        # averaged over 4 x 4 squares the codec's error (about 1.5 here) is far below the clips' difference (9)
        assert mad(left, real, 4) < 4 and mad(right, loser, 4) < 4
        assert mad(left, loser, 4) > 2 * mad(left, real, 4) and mad(right, real, 4) > 2 * mad(right, loser, 4)
        assert frames[:, 8:-8, 64 + 1:64 + SEPARATOR - 1].min() > 200    # the white column between
        pid = store.records["real"][entry["real_id"]]["prompt_id"]
        assert entry == {"file": path.name, "real_id": entry["real_id"], "generated_id": entry["generated_id"],
                         "generator": entry["generator"], "prompt_id": pid,
                         "caption": f"a clip called {entry['real_id']}", "frames": 9, "width": 132, "height": 64}


def test_generator_filter_and_a_rerun_replaces_only_its_own_files(store, vae, tmp_path):
    out = tmp_path / "out"
    first = write_previews(store, out, n=8, vae=vae)
    assert len(first.files) == 4 and {p.name for p in out.iterdir()} == {p.name for p in first.files} | {"index.json"}
    (out / "clip_a__genA_0.mp4.partial").write_bytes(b"left by a killed run")
    again = write_previews(store, out, n=8, vae=vae, generator="gen/B")            # fewer files: the rest go
    assert [p.name for p in again.files] == ["clip_b__gen__B_0.mp4"] and again.pairs_in_store == 1
    assert sorted(p.name for p in out.iterdir()) == ["clip_b__gen__B_0.mp4", "index.json"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files that are not previews \(notes.txt\)"):
        write_previews(store, out, vae=vae)
    assert (out / "notes.txt").read_text() == "mine" and again.files[0].is_file()  # nothing was touched
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "index.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="was not written by the preview tool"):
        write_previews(store, tmp_path / "other", vae=vae)
    with pytest.raises(ValueError, match="is a file"):
        write_previews(store, out / "notes.txt", vae=vae)


def test_bad_requests_are_named(store, vae, tmp_path):
    from diffusers import AutoencoderKLWan

    from megatron_regdpo.data.encode.tiny import TINY_VAE

    with pytest.raises(ValueError, match="n=0"):
        write_previews(store, tmp_path / "out", n=0, vae=vae)
    with pytest.raises(ValueError, match=r"no negatives from generator 'genC' \(it has \['gen/B', 'genA'\]\)"):
        write_previews(store, tmp_path / "out", vae=vae, generator="genC")
    other = WanVAE(AutoencoderKLWan(**TINY_VAE, latents_mean=[0.5] * 16), path="other-vae")
    with pytest.raises(ValueError, match="VAE other-vae: latents_mean differs from the store's"):
        write_previews(store, tmp_path / "out", vae=other)
    moved = GTPairStore(shutil.copytree(store.path, tmp_path / "moved.zarr"), "a")
    moved.update_attrs(vae={**moved.attrs["vae"], "path": str(tmp_path / "gone")})
    with pytest.raises(ValueError, match=re.escape(f"VAE folder '{tmp_path / 'gone'}' (attrs vae.path) is gone; "
                                                   "give the folder of the same VAE with --vae")):
        write_previews(moved, tmp_path / "out")
    assert not (tmp_path / "out").exists()                                # refused before writing anything
    empty = make_store(tmp_path / "empty", vae, reals=("clip_a",), negatives=())
    with pytest.raises(ValueError, match="has no pairs: run tools/make_gt_pairs.py generate"):
        write_previews(empty, tmp_path / "out", vae=vae)


def test_i2v_store_before_finalize_and_the_store_vae(vae, tmp_path):
    store = make_store(tmp_path, vae, task="i2v", reals=("clip_a",), negatives=({0: ("genA", 0)},), finalize=False)
    assert store.pair_index() == []                                       # the commit log's pairs are used
    result = write_previews(store, tmp_path / "out")                       # loads attrs["vae"]["path"]
    assert len(result.files) == 1
    assert read_video(result.files[0])[2].shape == (9, 64, 2 * 64 + SEPARATOR, 3)


def test_mpeg4_fallback_writes_a_playable_file(tmp_path):
    assert preview_encoder()[0] == (encoder_for("h264") or MPEG4)[0]
    frames = np.random.default_rng(0).integers(0, 256, (5, 30, 44, 3), dtype=np.uint8)
    write_video(tmp_path / "x.mp4", frames, 12.5, MPEG4)
    codec, fps, back = read_video(tmp_path / "x.mp4")
    assert codec == "mpeg4" and fps == 12.5 and back.shape == frames.shape
    assert not list(tmp_path.glob("*.partial"))
