"""Preprocessing, negatives and pair reading, in-process with the tiny encoders and the debug Wan."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from megatron_regdpo.data.decode import DecodeOptions
from megatron_regdpo.data.decode.synth import write_video
from megatron_regdpo.data.errors import SkipReport, read_report
from megatron_regdpo.data.inputs import find_inputs
from megatron_regdpo.data.pairs import PairDataset, collate
from megatron_regdpo.data.preprocess import PreprocessOptions, preprocess
from megatron_regdpo.data.store import GTPairStore, check_store

DECODE = DecodeOptions(fps=8, frames=9, short_side=64, bucket="1:1")
BAD = {"zero": "zero_length", "random": "corrupt", "truncated": "truncated"}


def make_input_folder(folder, clips, good=("vp9", "vp8", "mjpeg", "h264", "odd"), bad=True):
    """Captions as .txt files, except vp8's (captions.jsonl); broken files; one without a caption; one too short."""
    folder.mkdir(parents=True)
    names = [n for n in good if n in clips]
    for name in names + (list(BAD) if bad else []):
        shutil.copy(clips[name], folder / clips[name].name)
        if name != "vp8":
            (folder / clips[name].name).with_suffix(".txt").write_text(f"a clip called {name}\n")
    (folder / "captions.jsonl").write_text(json.dumps({"file": "vp8.webm", "caption": "the vp8 clip"}) + "\n")
    if bad:
        shutil.copy(clips["vp9"], folder / "uncaptioned.webm")
        write_video(folder / "short.webm", "vp8", 64, 64, 5, 24)
        (folder / "short.txt").write_text("too short")
    return names


def run(folder, store, paths, task="t2v", decode=DECODE, **kw):
    return preprocess(PreprocessOptions(input_dir=str(folder), store=str(store), models=paths, decode=decode,
                                        task=task, text_len=64, show_progress=False, **kw))


@pytest.fixture(scope="module")
def t2v(tmp_path_factory, clips, tiny_paths):
    root = tmp_path_factory.mktemp("t2v")
    names = make_input_folder(root / "in", clips)
    summary = run(root / "in", root / "s.zarr", tiny_paths)
    return root, names, summary


def test_find_inputs_reads_both_caption_styles(tmp_path, clips):
    make_input_folder(tmp_path / "in", clips)
    found = {v.sample_id: v.caption for v in find_inputs(tmp_path / "in")}
    assert found["vp8"] == "the vp8 clip" and found["vp9"] == "a clip called vp9"
    assert found["uncaptioned"] is None and "audio_only" not in found
    (tmp_path / "in" / "captions.jsonl").write_text('{"file": "x.mp4"}\n')
    with pytest.raises(ValueError, match="captions.jsonl:1"):
        find_inputs(tmp_path / "in")


def test_preprocess_writes_valid_store_and_reports_bad_inputs(t2v):
    root, names, summary = t2v
    assert summary.added == len(names) and summary.store_real == len(names)
    assert dict(summary.skipped.counts) == {**{r: 1 for r in BAD.values()}, "no_caption": 1, "too_short": 1}
    report = read_report(root / "s.zarr" / "skipped.jsonl")
    assert {(r["file"].rsplit("/", 1)[-1], r["reason"]) for r in report} >= {("zero.mp4", "zero_length"),
                                                                            ("uncaptioned.webm", "no_caption")}
    check = check_store(root / "s.zarr")
    assert check.ok, check.problems
    assert check.counts["real"] == len(names) and check.counts["texts"] == len(names) + 1   # + negative prompt
    store = GTPairStore(root / "s.zarr")
    lat = store.read_latents("real", "vp9")
    assert lat.dtype == torch.bfloat16 and lat.shape == (16, 3, 8, 8)
    assert store.records["real"]["vp9"]["backend"] == "pyav" and store.attrs["vae"]["z_dim"] == 16
    emb, mask = store.read_text(store.records["real"]["vp8"]["prompt_id"])
    assert emb.shape == (64, 32) and emb[mask.sum():].eq(0).all()


def test_rerun_adds_nothing_and_reports_again(t2v, tiny_paths):
    root, names, _ = t2v
    again = run(root / "in", root / "s.zarr", tiny_paths)
    assert again.added == 0 and again.already == len(names) and again.skipped.total == 5
    with pytest.raises(ValueError, match="frames=9.*frames=17"):
        run(root / "in", root / "s.zarr", tiny_paths, decode=DecodeOptions(fps=8, frames=17, short_side=64,
                                                                             bucket="1:1"))


def test_generate_negatives_and_read_pairs(t2v, pg):
    from megatron_regdpo.data.negatives import SamplerOptions, debug_arch_for, generate_negatives
    from megatron_regdpo.models.wan.build import build_wan

    root, names, _ = t2v
    store = GTPairStore(root / "s.zarr", "a")
    arch = debug_arch_for(store.attrs)
    model = build_wan(arch, pg)
    opts = SamplerOptions(steps=3, negatives_per_clip=2, guidance=3.0)
    result = generate_negatives(store, model, arch, opts, "debug", show_progress=False)
    assert result["generated"] == 2 * len(names)
    assert generate_negatives(store, model, arch, opts, "debug", show_progress=False)["already"] == 2 * len(names)
    assert check_store(store.path).ok
    data = PairDataset(store.path)
    assert len(data) == 2 * len(names) and set(data.shapes()) == {(16, 3, 8, 8)}
    batch = collate([data[0], data[1]])
    assert batch["winner_BCFhw"].shape == batch["loser_BCFhw"].shape == (2, 16, 3, 8, 8)
    assert batch["text_BTE"].shape == (2, 64, 32) and batch["pair_ids"] == [0, 1]
    assert not torch.equal(batch["loser_BCFhw"][0], batch["loser_BCFhw"][1])        # k=0 and k=1 differ
    from megatron_regdpo.config.schema import DataConfig
    from megatron_regdpo.data.pairs import build_pair_sampler

    sampler = build_pair_sampler(DataConfig(text_len=64, micro_batch_pairs=1), data, dp_rank=0, dp_size=2, seed=0)
    assert sampler.steps_per_epoch() == len(names)
    with pytest.raises(ValueError, match="data.text_len=512 but the store"):
        build_pair_sampler(DataConfig(), data, 0, 1, 0)


def test_import_negatives_from_other_generators(t2v, tiny_paths, tmp_path):
    from megatron_regdpo.data.encode import WanVAE
    from megatron_regdpo.data.negatives import import_negatives

    root, names, _ = t2v
    store = GTPairStore(root / "s.zarr", "a")
    write_video(tmp_path / "genA" / "vp9.webm", "vp9", 128, 72, 30, 24)   # other size: normalised like the real
    write_video(tmp_path / "genA" / "mjpeg.mkv", "vp8", 64, 64, 30, 24)
    write_video(tmp_path / "genA" / "unknown.webm", "vp8", 64, 64, 30, 24)
    (tmp_path / "genB").mkdir()
    (tmp_path / "genB" / "vp9.mp4").write_bytes(b"")
    report = SkipReport(tmp_path / "skipped.jsonl")
    result = import_negatives(store, tmp_path, WanVAE.load(tiny_paths.vae), report, show_progress=False)
    assert result["imported"] == 2 and result["per_generator"] == {"genA": 2}
    assert dict(report.counts) == {"no_real_clip": 1, "zero_length": 1}
    check = check_store(store.path)
    assert check.ok, check.problems
    assert check.generators["genA"] == 2 and store.committed("generated", "vp9.genA.0")


def test_i2v_store_has_image_conditioning_and_samples(tmp_path, clips, tiny_paths, pg):
    from megatron_regdpo.data.negatives import SamplerOptions, debug_arch_for, generate_negatives
    from megatron_regdpo.models.wan.build import build_wan

    make_input_folder(tmp_path / "in", clips, good=("vp9", "mjpeg"), bad=False)
    summary = run(tmp_path / "in", tmp_path / "s.zarr", tiny_paths, task="i2v")
    assert summary.added == 2
    store = GTPairStore(tmp_path / "s.zarr", "a")
    clip_IE, cond_CFhw = store.read_image("vp9")
    assert clip_IE.shape == (257, 32) and cond_CFhw.shape == (20, 3, 8, 8)
    arch = debug_arch_for(store.attrs)
    assert (arch.in_channels, arch.image_dim) == (36, 32)
    generate_negatives(store, build_wan(arch, pg), arch, SamplerOptions(steps=2, solver="euler"), "debug",
                       show_progress=False)
    check = check_store(store.path)
    assert check.ok and check.counts["image"] == 2 and check.counts["pairs"] == 2, check.problems
    item = PairDataset(store.path)[0]
    assert item["cond_CFhw"].shape == (20, 3, 8, 8) and item["image_IE"].shape == (257, 32)


def test_model_that_does_not_fit_the_store_is_refused(t2v):
    from megatron_regdpo.data.negatives import check_model_fits
    from megatron_regdpo.models.wan.arch import SIZES

    with pytest.raises(ValueError, match="text_dim 4096, the store's text embeddings are 32 wide"):
        check_model_fits(SIZES["14B"], GTPairStore(t2v[0] / "s.zarr").attrs)


def test_unexpected_errors_skip_one_file_but_not_a_whole_data_set(tmp_path):
    from megatron_regdpo.data.errors import MAX_UNEXPECTED_IN_A_ROW, BadInput

    report = SkipReport(tmp_path / "r.jsonl")

    def boom(msg):
        raise RuntimeError(msg)
    assert report.attempt("a.mp4", "test", boom, "odd file") is None
    assert report.attempt("b.mp4", "test", lambda: 7) == 7                  # a success resets the streak
    assert report.attempt("c.mp4", "test", lambda: (_ for _ in ()).throw(BadInput("c.mp4", "corrupt", "x"))) is None
    assert dict(report.counts) == {"unexpected_error": 1, "corrupt": 1}
    assert read_report(tmp_path / "r.jsonl")[0]["detail"] == "RuntimeError: odd file"
    with pytest.raises(RuntimeError, match="systematic"):
        for i in range(MAX_UNEXPECTED_IN_A_ROW):
            report.attempt(f"{i}.mp4", "test", boom, "systematic")
