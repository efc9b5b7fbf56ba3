"""The recipe against the files a run reads, checked before any rank builds a model.

A store or reference cache made with other settings is mostly shape-compatible with the recipe: a store with
16 text tokens trains a recipe that says 32, a cache computed with shift 3 serves a run with shift 5, a store
whose clips fall into shape buckets smaller than a global batch trains without them. Each would train silently
on wrong numbers, so each is an error here naming the file, the key and both values. (The base checkpoint's
architecture is checked by `resolve_arch(cfg.model, cfg.checkpoint.load)`.)
"""
from __future__ import annotations

import sys
from pathlib import Path

from megatron_regdpo.config import ConfigError, video_tokens
from megatron_regdpo.data.decode.normalize import bucket_hw
from megatron_regdpo.reference.cache import attr_mismatches, checkpoint_fingerprint, read_cache_attrs

I2V_MASK_CHANNELS = 4  # the first-frame mask ahead of the conditioning latents (data/store: image/<id>/cond)


class InputMismatch(ConfigError):
    """The recipe disagrees with a checkpoint, store or reference cache it names (one line per key)."""


def store_errors(cfg, arch, store: str | Path, attrs: dict, shapes: list[tuple[int, ...]]) -> list[str]:
    """The store's task, clip geometry, text length and embedding widths, and every pair's latent shape."""
    data, errors = cfg.data, []

    def differ(key: str, have, want, recipe_key: str) -> None:
        if have is not None and have != want:
            errors.append(f"{store}: the store has {key}={have!r}, the recipe has {recipe_key}={want!r}")

    differ("task", attrs.get("task"), arch.task, "the model's task (model.size/task/image_dim)")
    for key in ("frames", "text_len"):  # fps is not compared: the model does not see it (a preprocessing knob)
        differ(key, attrs.get(key), getattr(data, key), f"data.{key}")
    bucket, short = attrs.get("bucket"), attrs.get("short_side")
    fixed = bucket not in (None, "auto") and short is not None
    if fixed:
        differ(f"bucket={bucket!r} at short_side", bucket_hw(bucket, short), (data.height, data.width),
               "(data.height, data.width)")
    elif short is not None:
        differ("short_side (bucket 'auto')", short, min(data.height, data.width), "min(data.height, data.width)")
    differ("text_encoder.dim", (attrs.get("text_encoder") or {}).get("dim"), arch.text_dim, "model.text_dim")
    if arch.task == "i2v":
        image = attrs.get("image_encoder") or {}
        differ("image_encoder.dim", image.get("dim"), arch.image_dim, "model.image_dim")
        differ("image_encoder.tokens", image.get("tokens"), arch.image_tokens, "the model's image tokens (257)")
    _, (lf, lh, lw) = video_tokens(data.frames, data.height, data.width)
    for shape in sorted(set(shapes)):
        c, f, h, w = shape
        pairs = shapes.count(shape)
        want_in = c if arch.task == "t2v" else 2 * c + I2V_MASK_CHANNELS  # noisy latents (+ mask + first frame)
        if (c, want_in) != (arch.out_channels, arch.in_channels):
            errors.append(f"{store}: {pairs} pair(s) have {c} latent channels (shape {list(shape)}), the model has "
                          f"in_channels={arch.in_channels}, out_channels={arch.out_channels} (model.size="
                          f"{cfg.model.size!r}; {arch.task} needs in_channels={want_in}, out_channels={c})")
        if f != lf or (fixed and (h, w) != (lh, lw)):
            want = [lf, lh, lw] if fixed else [lf, "*", "*"]
            errors.append(f"{store}: {pairs} pair(s) have latent (frames, height, width) {[f, h, w]}, the recipe's "
                          f"data.frames/height/width={data.frames}/{data.height}/{data.width} give {want}")
    return errors


def reference_cache_errors(cfg, cache: str | Path, flow_matching, dtype) -> list[str]:
    """A cached reference's every noise and model setting: seed, flow-matching schedule, base checkpoint
    (content fingerprint), dtype. The step key is checked per lookup (the trainer asks with the cache's)."""
    attrs = read_cache_attrs(cache)
    if cfg.checkpoint.load is None:
        return [f"objective.reference.mode=cached needs checkpoint.load: {cache} holds the errors of the base "
                f"checkpoint {(attrs.get('model') or {}).get('checkpoint')!r}"]
    expect = {"seed": cfg.run.seed, "flow_matching": flow_matching,
              "model": {"checkpoint_id": checkpoint_fingerprint(cfg.checkpoint.load), "dtype": str(dtype)}}
    recipe = {"seed": "run.seed", "flow_matching.shift": "objective.shift", "model.dtype": "precision.params_dtype",
              "flow_matching.timestep_sampling": "objective.timestep_sampling"}
    errors = []
    for key, have, want in attr_mismatches(attrs, expect):
        if key == "model.checkpoint_id":
            was = (attrs.get("model") or {}).get("checkpoint")
            errors.append(f"{cache} was computed from checkpoint {was!r} (model.checkpoint_id={have!r}); "
                          f"checkpoint.load={cfg.checkpoint.load!r} is another checkpoint (id {want!r}): "
                          f"recompute it with tools/precompute_reference.py --checkpoint {cfg.checkpoint.load}")
        else:
            errors.append(f"{cache} was computed with {key}={have!r}; the recipe has "
                          f"{recipe.get(key, key)}={want!r}")
    return errors


def small_bucket_errors(cfg, sampler, store: str | Path, rank0: bool = True) -> list[str]:
    """Shape buckets with fewer pairs than one global batch are never trained under data.small_buckets=drop:
    an error by default, a warning when the recipe asks for drop, nothing under repeat."""
    small = sampler.small_buckets()
    if not small or cfg.data.small_buckets == "repeat":
        return []
    lost = sum(small.values())
    named = ", ".join(f"{list(s)}: {n}" for s, n in small.items())
    line = (f"{store}: {lost} of {len(sampler.shapes)} training pairs are in latent shape buckets smaller than "
            f"one global batch (data.global_batch_pairs={cfg.data.global_batch_pairs}) and are never trained "
            f"(shape: pairs) {named}")
    if cfg.data.small_buckets == "drop":
        if rank0:
            print(f"warning: {line} (data.small_buckets=drop)", file=sys.stderr)
        return []
    return [f"{line}; set data.small_buckets=repeat to fill their batches with their own pairs, or "
            f"data.small_buckets=drop to train without them"]



def batch_size_errors(cfg, shapes: list[tuple[int, ...]], store: str | Path, held_out: int) -> list[str]:
    """A global batch that no latent shape bucket fills trains nothing (the sampler would have no step):
    one error naming the batch, the store's pairs and what to change, before the sampler is built."""
    g = cfg.data.global_batch_pairs
    buckets = {s: shapes.count(s) for s in sorted(set(shapes))}
    if not shapes or max(buckets.values()) >= g or cfg.data.small_buckets == "repeat":
        return []  # repeat fills a batch with its own bucket's pairs (repeating them within a batch)
    pairs = (f"{len(shapes) + held_out} pairs, {held_out} of them held out by eval.holdout_pairs, so "
             f"{len(shapes)} training pairs" if held_out else f"{len(shapes)} pairs")
    if g > len(shapes):
        what = f"data.global_batch_pairs={g} is larger than the data: {store} has {pairs}"
    else:
        named = ", ".join(f"{list(s)}: {n}" for s, n in buckets.items())
        what = (f"no latent shape bucket of {store} ({pairs}; shape: pairs {named}) has the "
                f"data.global_batch_pairs={g} pairs of one batch (a batch never mixes shapes)")
    return [f"{what}; lower data.global_batch_pairs (and data.micro_batch_pairs) to at most "
            f"{max(buckets.values())}, add pairs, or set data.small_buckets=repeat to repeat pairs within a batch"]


def resume_mismatch(checkpoint: str | Path, store: str | Path, reason: str) -> InputMismatch:
    """A run folder's checkpoint whose sampler state is for another pair list (the store grew or shrank, or
    data.small_buckets / run.seed changed): resuming would replay other batches, so the run stops."""
    return InputMismatch(
        f"{checkpoint} cannot resume on data.store={store}: {reason}. The checkpoint's data order is for the "
        f"pair list it was trained on; restore the store (and run.seed, data.small_buckets, "
        f"eval.holdout_pairs) to what it trained on, or start a new run in another folder (run.name or run.output_dir)")
