"""Stable Diffusion 3 / 3.5 adapter (diffusers ``StableDiffusion3Pipeline``) implementing ``FlowModel``.

* Latents: [B, C, H/8, W/8] (C = 16 for SD3/3.5), the VAE space after SD3's shift/scale
  (x = (z − shift)·scale), exactly the pipeline's latent space.
* Text: two CLIP encoders + T5 through the pipeline's own ``encode_prompt``; the negative branch is the
  empty prompt (or ``negative_prompt``). ``encode`` returns both branches per prompt, batch-first.
* Velocity: CFG by batch doubling [uncond, cond], v = v_u + w·(v_c − v_u) with w = ``guidance_scale``
  (no CFG when w ≤ 1, as in diffusers); timestep = 1000·σ (METHODS.md §1.5).
* Schedule: ``sd3_diffusers(T, shift=scheduler.config.shift)``, the scheduler's own double-shift grid (§1.2).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from flowalign.errors import UserError
from flowalign.models.base import FlowAdapter, load_pipeline, pipeline_modules
from flowalign.types import Cond

DEFAULT_PATH = "stabilityai/stable-diffusion-3.5-medium"


class SD3Model(FlowAdapter):
    # METHODS.md §3.7: r/α 32/64 on the joint-attention projections of every MMDiT block.
    lora_targets = (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    )
    lora_rank = 32
    lora_alpha = 64

    def __init__(self, pipe: Any, *, guidance_scale: float = 4.5, height: int = 512, width: int = 512,
                 max_sequence_length: int = 128, negative_prompt: str = "", dtype: torch.dtype = torch.float32):
        vsf = pipe.vae_scale_factor
        multiple = vsf * pipe.transformer.config.patch_size
        if height % multiple or width % multiple:
            raise UserError(f"SD3 height/width must be multiples of {multiple}, got {height}x{width}")
        self.pipe = pipe
        self.height, self.width = int(height), int(width)
        self.max_sequence_length = int(max_sequence_length)
        self.negative_prompt = negative_prompt
        channels = pipe.transformer.config.in_channels
        super().__init__(
            pipe.transformer, guidance_scale=guidance_scale, dtype=dtype,
            latent_shape=(channels, height // vsf, width // vsf), components=pipeline_modules(pipe),
        )

    @classmethod
    def from_pretrained(cls, path: str = "", *, dtype: torch.dtype = torch.float32, device: Any = "cpu",
                        guidance_scale: float = 4.5, height: int = 512, width: int = 512,
                        max_sequence_length: int = 128, negative_prompt: str = "", **kwargs: Any) -> "SD3Model":
        """Load from a local diffusers directory or hub id (default SD3.5-medium); ``kwargs`` go to diffusers."""
        from diffusers import StableDiffusion3Pipeline

        pipe = load_pipeline(StableDiffusion3Pipeline, path or DEFAULT_PATH, dtype=dtype, device=device,
                             family="sd3", **kwargs)
        return cls(pipe, guidance_scale=guidance_scale, height=height, width=width,
                   max_sequence_length=max_sequence_length, negative_prompt=negative_prompt, dtype=dtype)

    # ---- FlowModel ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Cond:
        """Per prompt: T5+CLIP token embeddings and pooled CLIP embeddings of the prompt and of the negative."""
        prompts = list(prompts)
        pe, neg_pe, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=True,
            negative_prompt=[self.negative_prompt] * len(prompts), max_sequence_length=self.max_sequence_length,
        )
        return {
            "prompt_embeds": pe,  # [N, 77 + S_t5, D]
            "pooled": pooled,  # [N, P]
            "neg_prompt_embeds": neg_pe,  # [N, 77 + S_t5, D]
            "neg_pooled": neg_pooled,  # [N, P]
        }

    def schedule(self, steps: int) -> Tensor:
        from flowalign.samplers.schedules import sd3_diffusers

        cfg = self.pipe.scheduler.config
        return sd3_diffusers(steps, shift=float(cfg.get("shift", 3.0)),
                             num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)))  # [T+1]

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """v(x, σ | c) with CFG; x [B, C, h, w] fp32 → v [B, C, h, w] fp32."""
        b = x.shape[0]
        t = self._sigma_batch(sigma, b, x.device) * 1000.0  # [B] model timestep in [0, 1000]
        cfg = self.guidance_scale > 1.0
        h = x.to(self.dtype)
        enc, pooled = cond["prompt_embeds"], cond["pooled"]
        if cfg:  # one forward on [uncond, cond], as the diffusers pipeline does
            h, t = torch.cat([h, h]), torch.cat([t, t])  # [2B, ...]
            enc = torch.cat([cond["neg_prompt_embeds"], enc])
            pooled = torch.cat([cond["neg_pooled"], pooled])
        out = self.transformer(
            hidden_states=h, timestep=t, encoder_hidden_states=enc.to(self.dtype),
            pooled_projections=pooled.to(self.dtype), return_dict=False,
        )[0].float()  # fp32 for the CFG combination and the kernels
        if not cfg:
            return out
        v_u, v_c = out.chunk(2)
        return v_u + self.guidance_scale * (v_c - v_u)  # [B, C, h, w]

    def decode(self, x: Tensor) -> Tensor:
        """Latents [B, C, h, w] → images [B, 3, H, W] in [0, 1] (fp32 VAE; differentiable)."""
        vae = self.pipe.vae
        z = x.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        img = vae.decode(z, return_dict=False)[0]  # [B, 3, H, W] in [-1, 1]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] → latents (VAE mean; for flow-matching pretraining and tests)."""
        vae = self.pipe.vae
        z = vae.encode(images.to(device=vae.device, dtype=vae.dtype) * 2 - 1).latent_dist.mean
        return ((z - vae.config.shift_factor) * vae.config.scaling_factor).float()
