"""Transformer Engine's shape rules for model.backend='te', checked before a GPU meets them.

TE rejects, deep in the first block, shapes that the config alone decides. Each rule cites the TE source
it mirrors (NVIDIA/TransformerEngine, transformer_engine/pytorch/; unchanged from v2.4 to 2.20.0.dev0).
The `local` backend has none of them: its context parallelism (models/wan/attention.py,
ContextParallelSDPAttention) all-gathers contiguous chunks and needs only tokens % cp, checked for all.

FP8 (precision.fp8 != 'none'): utils.py `assert_dim_for_fp8_exec`, called by module/linear.py's
`_linear_forward` on the LOCAL input (before the sequence-parallel all-gather) and the weight, wants
prod(leading dims) % 8 == 0 and last dim % 16 == 0. The FP8 GEMMs are the TE linears of the Wan block
(models/wan/spec.py); conditioning, patch embedding, head and LoRA adapters are plain torch, not FP8.
Their inputs are [S, B, width]:
  linear_qkv, linear_q, linear_fc1  S = tokens / cp (/ tp under sequence parallelism)
  linear_proj x2, linear_fc2        S = tokens / cp: tp times the above, so implied by it
  linear_kv                         S = data.text_len (the context is replicated, never split)
  linear_kv_img (I2V)               S = the 257 CLIP image tokens
B = samples per forward: 2 x data.micro_batch_pairs for objective.pair_forward='joint' (and for every
reference forward), micro_batch_pairs for 'separate'; an evaluation's last micro-batch may hold fewer.
Widths (and weight rows): hidden, hidden/tp (linear_proj input), ffn/tp (linear_fc2 input) % 16.

Context parallelism (parallel.cp > 1), attention/dot_product_attention/context_parallel.py: every
cp_comm_type splits a rank's chunk in two for load balancing and asserts it even (AttnFuncWithCPAndKVP2P:
"Sequence length per GPU needs to be divisible by 2!"; AttnFuncWithCPAndKVAllGather and
AttnFuncWithCPAndQKVOA2A: "requires seq_len % 2 == 0"); 'a2a' trades the sequence split for a head
split, asserting "num_heads % cp_size == 0" on this TP rank's heads.
"""
from __future__ import annotations

import dataclasses

FP8_ROWS, FP8_WIDTH = 8, 16


def fp8_gemm_rows(cfg, tokens: int, image_tokens: int) -> list[tuple[str, int, str]]:
    """(linears, rows per sample, how) of every FP8 GEMM input whose rows the config decides."""
    par = cfg.parallel
    split = par.cp * (par.tp if par.sequence_parallel else 1)
    how = f"{tokens:,} video tokens / cp {par.cp}" + (f" / tp {par.tp} (sequence parallel)"
                                                     if par.sequence_parallel else "")
    gemms = [("linear_qkv/linear_q/linear_fc1", tokens // split, how),
             ("linear_kv", cfg.data.text_len, f"data.text_len={cfg.data.text_len} text tokens")]
    if image_tokens:
        gemms.append(("linear_kv_img", image_tokens, f"{image_tokens} CLIP image tokens"))
    return gemms


def forward_batches(cfg, dp: int) -> list[tuple[int, str]]:
    """(samples, why) of every forward the policy and reference run, the smallest first."""
    pairs = cfg.data.micro_batch_pairs
    joint = cfg.objective.pair_forward == "joint"
    per = 2 if joint else 1
    out = {per * pairs: f"{'2 x ' if joint else ''}data.micro_batch_pairs={pairs},"
                        f" objective.pair_forward={cfg.objective.pair_forward!r}"}
    held = cfg.eval.holdout_pairs
    if cfg.eval.interval > 0 and held > 0 and dp > 0:  # trainer.evaluate: ids[dp_rank::dp] in micro-batches
        for tail in sorted({len(range(r, held, dp)) % pairs for r in range(dp)} - {0}):
            out.setdefault(per * tail, f"the last evaluation micro-batch of {tail} pairs: eval.holdout_pairs={held}"
                                       f" over dp={dp} is not a multiple of dp x micro_batch_pairs = {dp * pairs}")
    return sorted(out.items())


def te_shape_errors(cfg, arch, tokens: int, latent_frames: int, dp: int, suggest: bool = True) -> list[str]:
    """TE's rules for this config (empty for the local backend). `tokens` must already divide by cp
    (and tp*cp under sequence parallelism); `arch` may be None (arch-dependent rules are skipped)."""
    par, prec = cfg.parallel, cfg.precision
    if cfg.model.backend != "te":
        return []
    errors: list[str] = []
    heads = getattr(arch, "num_heads", None)
    fixes = _Fixes(cfg, arch, tokens, latent_frames, dp) if suggest else None
    if par.cp > 1 and (tokens // par.cp) % 2:
        alt = fixes.cp_even() if fixes else ""
        errors.append(f"parallel.cp_comm={par.cp_comm!r} with model.backend='te' needs an even number of video "
                      f"tokens per CP rank (TE splits each rank's chunk in two): {tokens:,} / cp {par.cp} = "
                      f"{tokens // par.cp:,}{alt}")
    if par.cp > 1 and par.cp_comm == "a2a" and heads and heads % par.tp == 0 and (heads // par.tp) % par.cp:
        alt = fixes.a2a() if fixes else ""
        errors.append(f"parallel.cp_comm='a2a' with model.backend='te' needs the heads per TP rank divisible by "
                      f"parallel.cp: {heads} heads / tp {par.tp} = {heads // par.tp}, not divisible by cp "
                      f"{par.cp}{alt}")
    if prec.fp8 == "none":
        return errors
    need = f"precision.fp8={prec.fp8!r} needs FP8 GEMM inputs with rows a multiple of {FP8_ROWS}"
    batches = forward_batches(cfg, dp)
    for name, per_sample, how in fp8_gemm_rows(cfg, tokens, _image_tokens(arch)):
        bad = [(b, src) for b, src in batches if per_sample * b % FP8_ROWS]
        if bad:
            b, src = bad[0]
            alt = fixes.rows(name) if fixes else ""
            errors.append(f"{need}: {name} gets {how} = {per_sample:,} rows per sample x {b} samples ({src})"
                          f" = {per_sample * b:,} (mod {FP8_ROWS} = {per_sample * b % FP8_ROWS}){alt}")
    if arch is not None and getattr(arch, "ffn_dim", None) and par.tp >= 1:
        hidden = arch.num_heads * arch.head_dim
        widths = {"hidden": hidden, f"hidden {hidden} / tp {par.tp}": hidden / par.tp,
                  f"ffn {arch.ffn_dim} / tp {par.tp}": arch.ffn_dim / par.tp}
        bad = [f"{k} = {v:g}" for k, v in widths.items() if v % FP8_WIDTH]
        if bad:
            errors.append(f"precision.fp8={prec.fp8!r} needs FP8 GEMM widths that are multiples of {FP8_WIDTH}: "
                          + ", ".join(bad))
    return errors


def _image_tokens(arch) -> int:
    return getattr(arch, "image_tokens", 0) if getattr(arch, "image_dim", None) is not None else 0


class _Fixes:
    """The nearest changes that satisfy every TE rule, worded as '; fits with ...' for the messages."""

    def __init__(self, cfg, arch, tokens: int, latent_frames: int, dp: int):
        self.cfg, self.arch, self.tokens, self.latent_frames, self.dp = cfg, arch, tokens, latent_frames, dp

    def _ok(self, cfg, tokens: int, frames: int | None = None) -> bool:
        split = cfg.parallel.cp * (cfg.parallel.tp if cfg.parallel.sequence_parallel else 1)
        return tokens % split == 0 and not te_shape_errors(cfg, self.arch, tokens, frames or self.latent_frames,
                                                           self.dp, suggest=False)

    def _with(self, section: str, **values):
        return dataclasses.replace(self.cfg, **{section: dataclasses.replace(getattr(self.cfg, section), **values)})

    def frames(self) -> str:
        now = self.latent_frames
        per_frame = self.tokens // now
        near = [f for f in sorted(range(1, now + 65), key=lambda f: (abs(f - now), f))
                if f != now and self._ok(self.cfg, f * per_frame, f)][:2]
        return "data.frames=" + " or ".join(str(4 * (f - 1) + 1) for f in sorted(near)) if near else ""

    def micro_batch(self) -> str:
        data, dp = self.cfg.data, max(self.dp, 1)
        for pairs in range(data.micro_batch_pairs + 1, 65):
            if self._ok(self._with("data", micro_batch_pairs=pairs, global_batch_pairs=dp * pairs), self.tokens):
                whole = data.global_batch_pairs % (dp * pairs) == 0
                return f"data.micro_batch_pairs={pairs}" + (
                    "" if whole else f" (and data.global_batch_pairs a multiple of dp x {pairs} = {dp * pairs})")
        return ""

    def rows(self, name: str) -> str:
        par, data = self.cfg.parallel, self.cfg.data
        alts = []
        if name == "linear_kv":
            lens = [t for t in range(data.text_len + 1, data.text_len + 65)
                    if self._ok(self._with("data", text_len=t), self.tokens)]
            alts.append(f"data.text_len={lens[0]}" if lens else "")
        if name.startswith("linear_qkv"):
            alts.append(self.frames())
            if par.sequence_parallel and self._ok(self._with("parallel", sequence_parallel=False), self.tokens):
                alts.append(f"parallel.sequence_parallel=false ({self.tokens // par.cp:,} rows per sample)")
        alts.append(self.micro_batch())
        return _fits(alts)

    def cp_even(self) -> str:
        cps = [c for c in range(self.cfg.parallel.cp - 1, 1, -1)
               if self.cfg.parallel.cp % c == 0 and self._ok(self._with("parallel", cp=c), self.tokens)]
        return _fits([self.frames(), f"parallel.cp={cps[0]}" if cps else ""])

    def a2a(self) -> str:
        split = self.cfg.parallel.tp * self.cfg.parallel.cp
        swaps = [f"parallel.tp={t} cp={split // t}" for t in range(1, split // 2 + 1)
                 if split % t == 0 and self.arch.num_heads % t == 0
                 and (t > 1 or not self.cfg.parallel.sequence_parallel)
                 and self._ok(self._with("parallel", tp=t, cp=split // t), self.tokens)]
        return _fits(["parallel.cp_comm='all_gather' or 'p2p'", swaps[0] if swaps else ""])


def _fits(alternatives: list[str]) -> str:
    alts = [a for a in alternatives if a]
    return f"; fits with {', '.join(alts[:-1]) + ', or ' if len(alts) > 1 else ''}{alts[-1]}" if alts else ""
