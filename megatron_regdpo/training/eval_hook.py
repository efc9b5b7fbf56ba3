"""The trainer's validation videos (config `eval.videos`, `eval.clip`): what eval_videos.py does, for a run.

Every `eval.videos.interval` steps (0: eval.interval) the policy and the reference sample the same prompts from
the same noise into RUN_DIR/eval_videos/step_NNNNNNN/, and the step's metrics gain
    eval/videos              the files written (paths relative to the run folder), listed in metrics.jsonl
    eval/fm_err_policy, eval/fm_err_reference (+ /sigma_S per noise level)   eval_quality.fm_errors
    eval/clip_policy, eval/clip_reference, eval/clip_real                   with eval.clip
    time/eval_videos_s       wall time of the whole evaluation
The reference is the run's (objective.reference.mode): the policy with its adapters off (lora_base, and
cached with LoRA), the frozen copy (resident), swapped in for the evaluation (cpu_swap).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist

from megatron_regdpo.config import video_tokens
from megatron_regdpo.data.negatives import SamplerOptions
from megatron_regdpo.models.lora import has_lora, lora_disabled
from megatron_regdpo.parallel.data_parallel import unwrap

from .eval_quality import ModelContext, plain
from .eval_videos import VideoWriter, file_prompts, held_out, run_videos, summarize, swapped_in, write_index

FOLDER = "eval_videos"


def reference_context(reference, policy) -> ModelContext | None:
    """The run's reference as a model to sample with; None where it keeps no model (cached, full fine-tune)."""
    policy = unwrap(policy)
    if reference.mode == "lora_base" or (reference.mode == "cached" and has_lora(policy)):
        return lambda: lora_disabled(policy)
    if reference.mode == "resident":
        return plain(unwrap(reference.model))
    if reference.mode == "cpu_swap":
        return lambda: swapped_in(reference)
    return None


class EvalVideos:
    def __init__(self, run):
        cfg, vid = run.cfg, run.cfg.eval.videos
        store = run.dataset.store
        self.run, self.vid, self.interval = run, vid, vid.interval or cfg.eval.interval
        prompts, self.clips = held_out(store, run.dataset.pairs, run.eval_ids,
                                       vid.count if vid.prompts_file is None else 0)
        if vid.prompts_file is not None:
            _, latent = video_tokens(cfg.data.frames, cfg.data.height, cfg.data.width)
            prompts = file_prompts(store, vid.prompts_file, (store.attrs["vae"]["z_dim"], *latent), vid.count)
        if not prompts:
            raise ValueError(f"eval.videos.count={vid.count}: no prompts (eval.holdout_pairs="
                             f"{cfg.eval.holdout_pairs} held-out pairs, eval.videos.prompts_file={vid.prompts_file})")
        self.prompts = prompts
        self.opts = SamplerOptions(steps=vid.steps, solver=vid.solver, shift=vid.shift, guidance=vid.guidance,
                                   seed=cfg.run.seed)
        self.neg_TE = store.read_text(store.attrs["negative_prompt_id"])[0]
        self.models = {"policy": plain(run.model)}
        reference = reference_context(run.reference, run.model) if vid.reference else None
        if vid.reference and reference is None:  # config validation refuses this first
            raise ValueError("eval.videos.reference=true, but the run keeps no reference model")
        if reference is not None:
            self.models["reference"] = reference
        lead = dist.get_rank(run.pg.tp) == 0 and dist.get_rank(run.pg.cp) == 0
        self.writer = VideoWriter(store, run.device, cfg.eval.clip) if lead else None

    def due(self, step: int) -> bool:
        return step % self.interval == 0

    def __call__(self, step: int) -> dict:
        run, t0 = self.run, time.perf_counter()
        folder = run.run_dir / FOLDER / f"step_{step:07d}"
        was_training = run.model.training
        run.model.eval()
        try:
            records, errors = run_videos(
                self.prompts, self.clips, self.models, self.opts, self.neg_TE, folder, writer=self.writer,
                dp_rank=dist.get_rank(run.pg.dp), dp_size=run.dp_size, equal_rounds=run.cfg.parallel.fsdp,
                fm_sigmas=self.vid.fm_sigmas, seed=run.cfg.run.seed, device=run.device, dtype=run.dtype,
                cp_group=run.pg.cp)
        finally:
            run.model.train(was_training)
            if hasattr(run.model, "reshard"):  # FSDP2 keeps a trained root's weights gathered after a forward
                run.model.reshard()            # (for its backward); there is none here: shard them again
        metrics = summarize(records, errors, self.vid.fm_sigmas)
        if dist.get_rank() == 0:  # a replica's first rank: the folder is there
            write_index(folder, records, metrics, self.opts)
        metrics["eval/videos"] = [str(Path(FOLDER) / folder.name / r["file"]) for r in records]
        metrics["time/eval_videos_s"] = time.perf_counter() - t0
        return metrics


def maybe(run) -> EvalVideos | None:
    return EvalVideos(run) if run.cfg.eval.videos.count > 0 else None
