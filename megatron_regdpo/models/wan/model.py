"""The Wan2.1 video DiT on Megatron-Core: embeddings -> TransformerBlock of WanLayers -> adaLN head.

Legend: B batch, C latent channels, F/H/W latent frames/height/width, S tokens (this rank's), D hidden,
P = pt*ph*pw*C_out values per token.

Parallel layout of the token sequence (applied here, in one place):
- CP: after the patch embedding each context-parallel rank keeps one contiguous chunk of the tokens,
  and the RoPE table is sliced to the same chunk. `forward_tokens` returns this rank's chunk.
- SP: within the chunk, tokens are scattered over the TP group before the blocks and gathered after.
  Every rank's modulation sees only its tokens, so its gradient is summed over TP on the way back.
- PP: the first stage embeds patches, the last owns the head; the conditioning (time embedding,
  context, RoPE table) is recomputed on every stage from the batch every stage receives. Its weights
  are replicated on all stages (same seeded init) and tagged `pipeline_parallel`, so megatron-core's
  finalize_model_grads sums their gradients over the pipeline.
"""
from __future__ import annotations

import math

import torch
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from torch import nn

from megatron_regdpo.parallel.collectives import sum_grad_over_group
from megatron_regdpo.parallel.context import chunk_bounds, gather_replicated

from .arch import WanArch
from .embeddings import ConditionEmbedder, Rope3D
from .layer import WanLayer
from .lean import Fp32LayerNorm

CONDITION_INIT_SEED = 20251103  # same conditioning weights on every pipeline stage at random init


class WanModel(MegatronModule):
    # what megatron-core's schedules and finalize_model_grads ask of a model: a DiT has no word
    # embedding tied to an output layer, so nothing is shared between the first and last stage
    model_type = ModelType.encoder_or_decoder
    share_embeddings_and_output_weights = False
    fsdp_unit_modules = (WanLayer,)  # FSDP2 shards and gathers parameters one block at a time

    def __init__(self, config, arch: WanArch, layer_spec, pg_collection,
                 pre_process: bool = True, post_process: bool = True, vp_stage=None):
        super().__init__(config=config)
        self.arch, self.pre_process, self.post_process = arch, pre_process, post_process
        self.tp_group, self.cp_group, self.pp_group = pg_collection.tp, pg_collection.cp, pg_collection.pp
        self.sequence_parallel = config.sequence_parallel
        d = arch.hidden
        if pre_process:
            self.patch_embedding = nn.Conv3d(arch.in_channels, d, kernel_size=arch.patch, stride=arch.patch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(CONDITION_INIT_SEED)
            self.condition = ConditionEmbedder(arch)
        first_stage = torch.distributed.get_rank(pg_collection.pp) == 0
        for p in self.condition.parameters():
            setattr(p, "pipeline_parallel", True)
            # one copy counts in the gradient norm: megatron-core leaves `shared` parameters out of it
            setattr(p, "shared", not first_stage)
        config.has_cond_embedder = True  # read by megatron-core's finalize_model_grads
        self.rope = Rope3D(arch)
        self.recompute_full = bool(layer_spec.params.get("recompute_full"))
        self.decoder = TransformerBlock(config, layer_spec, post_layer_norm=False, pre_process=pre_process,
                                        post_process=post_process, pg_collection=pg_collection, vp_stage=vp_stage)
        if post_process:
            self.proj_out = nn.Linear(d, arch.out_channels * math.prod(arch.patch))
            self.scale_shift_table = nn.Parameter(torch.randn(1, 2, d) / d**0.5)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """megatron-core's sharding, plus: the conditioning weights live on every pipeline stage, so
        each stage's copy is a replica (only stage 0's is written) rather than a competing owner."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        pp_rank = torch.distributed.get_rank(self.pp_group)
        for key, sh in state.items():
            if key.startswith(f"{prefix}condition.") and hasattr(sh, "replica_id"):
                rid = sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)
                sh.replica_id = (pp_rank, *rid)
        return state

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand the previous stage's output here."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def token_grid(self, latent_shape) -> tuple[int, int, int]:
        (pt, ph, pw), (f, h, w) = self.arch.patch, latent_shape[-3:]
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent (F, H, W) = {(f, h, w)} is not divisible by the patch {self.arch.patch}")
        return f // pt, h // ph, w // pw

    def forward_tokens(self, latents_BCFHW, timestep_B, text_BTE, image_BIE=None) -> torch.Tensor:
        """This rank's tokens: predicted velocity patches [B, S_cp, P] on the last stage
        (S_cp = this CP rank's chunk, in `patchify` order); hidden states [S, B, D] elsewhere."""
        grid = self.token_grid(latents_BCFHW.shape)
        start, end = chunk_bounds(math.prod(grid), self.cp_group)
        temb_BD, modulation_B6D, context_BTD = self.condition(timestep_B, text_BTE, image_BIE)
        if self.sequence_parallel:
            modulation_B6D = sum_grad_over_group(modulation_B6D, self.tp_group)
        rope = self.rope.table(grid, device=latents_BCFHW.device)[start:end]
        x_SBD = None
        if self.pre_process:
            x_SBD = self.patch_embedding(latents_BCFHW).flatten(2).permute(2, 0, 1)[start:end].contiguous()
            if self.sequence_parallel:
                x_SBD = scatter_to_sequence_parallel_region(x_SBD, group=self.tp_group)
        if x_SBD is not None and self.recompute_full and torch.is_grad_enabled() and not x_SBD.requires_grad:
            # full recompute is megatron-core's reentrant CheckpointFunction: its output requires grad only
            # if one of its inputs does. With a frozen patch embedding and conditioning (LoRA) none does,
            # and the adapters inside the blocks would silently get no gradient at all.
            x_SBD = x_SBD.detach().requires_grad_()
        x_SBD = self.decoder(hidden_states=x_SBD, attention_mask=modulation_B6D,
                             context=context_BTD.transpose(0, 1).contiguous(), rotary_pos_emb=rope)
        if not self.post_process:
            return x_SBD
        if self.sequence_parallel:  # the head is replicated over TP: keep, do not sum, its gradient
            x_SBD = gather_from_sequence_parallel_region(x_SBD, tensor_parallel_output_grad=False,
                                                         group=self.tp_group)
        return self.head(x_SBD, temb_BD)

    def forward(self, latents_BCFHW, timestep_B, text_BTE, image_BIE=None, return_tokens: bool = False):
        """Predicted velocity [B, C_out, F, H, W] for the whole clip (gathered over CP) on the last stage;
        with `return_tokens`, this rank's token chunk as `forward_tokens` gives it (what training uses:
        calling the model, not the method, lets DDP/FSDP wrappers run their forward hooks)."""
        out_BSP = self.forward_tokens(latents_BCFHW, timestep_B, text_BTE, image_BIE)
        if return_tokens or not self.post_process:
            return out_BSP
        out_BSP = gather_replicated(out_BSP, self.cp_group, dim=1)
        return self.unpatchify(out_BSP, self.token_grid(latents_BCFHW.shape))

    def head(self, x_SBD, temb_BD) -> torch.Tensor:
        shift, scale = (self.scale_shift_table.float() + temb_BD.float()[:, None]).transpose(0, 1).unbind(0)
        # (layer_norm(x.float()) * (1 + scale) + shift).type_as(x), keeping x and the norm's statistics rather
        # than autograd's fp32 copies of x and of the normed x (lean.py)
        x_SBD = Fp32LayerNorm.apply(x_SBD, self.arch.eps, None, None, shift, scale)
        return self.proj_out(x_SBD).transpose(0, 1)                      # [B, S, P]

    def patchify(self, x_BCFHW: torch.Tensor) -> torch.Tensor:
        """[B, C, F, H, W] -> [B, S, P] in the token order of the model's output (the inverse of unpatchify)."""
        (f, h, w), (pt, ph, pw) = self.token_grid(x_BCFHW.shape), self.arch.patch
        b, c = x_BCFHW.shape[:2]
        x = x_BCFHW.reshape(b, c, f, pt, h, ph, w, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
        return x.reshape(b, f * h * w, pt * ph * pw * c)

    def unpatchify(self, out_BSP: torch.Tensor, grid) -> torch.Tensor:
        (f, h, w), (pt, ph, pw), b = grid, self.arch.patch, out_BSP.shape[0]
        out = out_BSP.reshape(b, f, h, w, pt, ph, pw, -1)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, -1, f * pt, h * ph, w * pw)

    def cp_chunk(self, tokens_BSP: torch.Tensor) -> torch.Tensor:
        """This CP rank's chunk of a [B, S, ...] token tensor (e.g. a patchified target)."""
        start, end = chunk_bounds(tokens_BSP.shape[1], self.cp_group)
        return tokens_BSP[:, start:end]
