"""The Wan2.1 video DiT on Megatron-Core: embeddings -> TransformerBlock of WanLayers -> adaLN head.

Legend: B batch, C latent channels, F/H/W latent frames/height/width, S tokens, T context tokens, D hidden.

Under pipeline parallelism the first stage embeds the patches, the last stage owns the head, and the
conditioning (time embedding, context, RoPE table) is recomputed on every stage from the batch, which
every stage receives: it is cheap and avoids sending anything but hidden states between stages.
"""
from __future__ import annotations

import math

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from torch import nn

from .arch import WanArch
from .embeddings import ConditionEmbedder, Rope3D


class WanModel(MegatronModule):
    def __init__(self, config, arch: WanArch, layer_spec, pg_collection,
                 pre_process: bool = True, post_process: bool = True, vp_stage=None):
        super().__init__(config=config)
        self.arch, self.pre_process, self.post_process = arch, pre_process, post_process
        d = arch.hidden
        if pre_process:
            self.patch_embedding = nn.Conv3d(arch.in_channels, d, kernel_size=arch.patch, stride=arch.patch)
        self.condition = ConditionEmbedder(arch)
        self.rope = Rope3D(arch)
        self.decoder = TransformerBlock(config, layer_spec, post_layer_norm=False, pre_process=pre_process,
                                        post_process=post_process, pg_collection=pg_collection, vp_stage=vp_stage)
        if post_process:
            self.proj_out = nn.Linear(d, arch.out_channels * math.prod(arch.patch))
            self.scale_shift_table = nn.Parameter(torch.randn(1, 2, d) / d**0.5)

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

    def forward(self, latents_BCFHW: torch.Tensor, timestep_B: torch.Tensor, text_BTE: torch.Tensor,
                image_BIE: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted velocity [B, C_out, F, H, W] on the last stage; hidden states [S, B, D] elsewhere."""
        grid = self.token_grid(latents_BCFHW.shape)
        temb_BD, modulation_B6D, context_BTD = self.condition(timestep_B, text_BTE, image_BIE)
        rope = self.rope.table(grid, device=latents_BCFHW.device)
        x_SBD = None
        if self.pre_process:
            x_SBD = self.patch_embedding(latents_BCFHW).flatten(2).permute(2, 0, 1).contiguous()
        x_SBD = self.decoder(hidden_states=x_SBD, attention_mask=modulation_B6D,
                             context=context_BTD.transpose(0, 1).contiguous(), rotary_pos_emb=rope)
        if not self.post_process:
            return x_SBD
        return self.head(x_SBD, temb_BD, grid, latents_BCFHW.shape[0])

    def head(self, x_SBD, temb_BD, grid, batch: int) -> torch.Tensor:
        shift, scale = (self.scale_shift_table.float() + temb_BD.float()[:, None]).transpose(0, 1).unbind(0)
        x_SBD = (nn.functional.layer_norm(x_SBD.float(), (x_SBD.shape[-1],), eps=self.arch.eps) * (1 + scale)
                 + shift).type_as(x_SBD)
        out = self.proj_out(x_SBD)                                        # [S, B, pt*ph*pw*C]
        (f, h, w), (pt, ph, pw) = grid, self.arch.patch
        out = out.transpose(0, 1).reshape(batch, f, h, w, pt, ph, pw, -1)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(batch, -1, f * pt, h * ph, w * pw)
