"""Stable Diffusion 3 / 3.5 adapter (diffusers ``StableDiffusion3Pipeline``) implementing ``FlowModel``.

* Latents: [B, C, H/8, W/8] (C = 16 for SD3/3.5), the VAE space after SD3's shift/scale
  (x = (z − shift)·scale), exactly the pipeline's latent space.
* Text: two CLIP encoders + T5 through the pipeline's own ``encode_prompt``; the negative branch is the
  empty prompt (or ``negative_prompt``). ``encode`` returns both branches per prompt, batch-first.
* Velocity: CFG by batch doubling [uncond, cond], v = v_u + w·(v_c − v_u) with w = ``guidance_scale``
  (no CFG when w ≤ 1, as in diffusers); timestep = N·σ, N = the scheduler's num_train_timesteps = 1000
  (METHODS.md §1.5).
* Schedule: the scheduler's own ``set_timesteps(T)`` grid (``base.flow_match_sigmas``): the double-shift grid of
  §1.2 for SD3/3.5, the pipeline's resolution-dependent μ when the scheduler has ``use_dynamic_shifting``, and
  ``shift_terminal`` / Karras / exponential / beta spacing when set. A scheduler option flowalign does not reproduce
  (another scheduler class, ``invert_sigmas``, ``stochastic_sampling``) is refused when the model is loaded.
* Noise: drawn in the pipeline dtype and upcast, so a seed gives ``StableDiffusion3Pipeline``'s start.
* Checked before loading (from the checkpoint's ``transformer/config.json`` and ``vae/config.json``; after loading
  when those cannot be read first): height/width multiples of vae_scale_factor·patch_size and at most
  pos_embed_max_size patches a side, a transformer whose channels are the VAE's latent channels, and
  ``max_sequence_length`` <= 512 (StableDiffusion3Pipeline's limit). ``default_steps`` is the pipeline's 28.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from flowalign.errors import UserError
from flowalign.models.base import (
    FlowAdapter, check_flow_match_scheduler, check_sizes, check_text_length, config_value, flow_match_sigmas,
    load_pipeline, loading_options, pipeline_modules, refuse_conditioned_variant, scheduler_mu, uses_cfg, vae_scale_factor,
)
from flowalign.types import Cond

DEFAULT_PATH = "stabilityai/stable-diffusion-3.5-medium"

# Published transformer architectures (the checkpoints' transformer/config.json), to count what a training step keeps
# without the weights (`flowalign bench train-memory --arch`, built by `base.build_transformer`).
TRANSFORMER = "SD3Transformer2DModel"  # the diffusers class these configs build
PIPELINE = "StableDiffusion3Pipeline"  # the diffusers pipeline of this family's checkpoints (model_index.json)
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "sd3.5-medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                         num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "sd3.5-large": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                        num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, dual_attention_layers=(),
                        qk_norm="rms_norm"),
}


def check_checkpoint(transformer: Mapping[str, Any], vae: Mapping[str, Any], *, height: int, width: int,
                     path: str = "") -> None:
    """One-line ``UserError`` when the checkpoint (its transformer's and VAE's configs: the ``config.json`` files before
    loading, the modules' configs after) cannot be sampled at ``height`` x ``width`` as StableDiffusion3Pipeline would:
    a transformer whose channels are not the VAE's latent channels, a size that is not a multiple of
    vae_scale_factor·patch_size, or one beyond the positional embedding (``pos_embed_max_size`` patches a side, which
    the transformer crops: diffusers' ``cropped_pos_embed`` raises past it)."""
    where = f"the checkpoint at {path!r}" if path else "the checkpoint"
    latent = int(vae["latent_channels"])
    refuse_conditioned_variant("SD3", where, transformer, TRANSFORMER, latent,
                               f"text-to-image takes the VAE's {latent} latent channels", "an SD3 ControlNet or inpainting "
                               "transformer", f"pass a StableDiffusion3Pipeline checkpoint such as {DEFAULT_PATH}")
    multiple = vae_scale_factor(vae) * int(config_value(transformer, "patch_size", TRANSFORMER))
    if height % multiple or width % multiple:
        raise UserError(f"SD3 height/width must be multiples of {multiple}, got {height}x{width} (model.kwargs / "
                        f"--model-arg height=... width=...)")
    max_pos = config_value(transformer, "pos_embed_max_size", TRANSFORMER)
    if max_pos and max(height, width) > int(max_pos) * multiple:
        raise UserError(f"SD3: {height}x{width} is beyond the transformer's positional embedding of {where} "
                        f"(pos_embed_max_size={max_pos} patches of {multiple} px a side): height and width must be at "
                        f"most {int(max_pos) * multiple} (model.kwargs / --model-arg height=... width=...)")


def step_inputs(config: dict[str, Any], prompts: int, height: int, width: int, dtype: torch.dtype, *,
                device: Any = "meta", frames: int = 1, max_sequence_length: int = 128,
                guidance_scale: float = 4.5) -> dict[str, Tensor]:
    """The transformer inputs of one training forward of ``prompts`` prompts as ``SD3Model.velocity`` batches them:
    both CFG branches (R = 2·prompts rows) when ``guidance_scale`` > 1, else the conditional branch alone
    (R = prompts), CLIP's 77 + T5's ``max_sequence_length`` text tokens (zeros)."""
    rows = 2 * prompts if uses_cfg(guidance_scale) else prompts
    m = {"device": device, "dtype": dtype}
    return dict(hidden_states=torch.zeros(rows, config["in_channels"], height // 8, width // 8, **m),  # [R, C, h, w]
                timestep=torch.zeros(rows, device=device),  # [R]
                encoder_hidden_states=torch.zeros(rows, 77 + max_sequence_length, config["joint_attention_dim"], **m),
                pooled_projections=torch.zeros(rows, config["pooled_projection_dim"], **m))  # [R, S, D], [R, P]


class SD3Model(FlowAdapter):
    # METHODS.md §3.7: r/α 32/64 on the joint-attention projections of every MMDiT block.
    lora_targets = (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    )
    lora_rank = 32
    lora_alpha = 64
    default_steps = 28  # StableDiffusion3Pipeline's num_inference_steps

    def __init__(self, pipe: Any, *, guidance_scale: float = 4.5, height: int = 512, width: int = 512,
                 max_sequence_length: int = 128, negative_prompt: str = "", dtype: torch.dtype = torch.float32):
        check_sizes("SD3", height=height, width=width, max_sequence_length=max_sequence_length)
        check_text_length("SD3", max_sequence_length)
        check_checkpoint(pipe.transformer.config, pipe.vae.config, height=height, width=width,
                         path=getattr(pipe, "name_or_path", None) or "")
        vsf = pipe.vae_scale_factor
        check_flow_match_scheduler(pipe.scheduler, "sd3")
        self.pipe = pipe
        # The pipeline's timestep is the scheduler's σ·N (N = num_train_timesteps, 1000 for SD3/3.5).
        self.timestep_scale = float(pipe.scheduler.config.get("num_train_timesteps", 1000))
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
                        max_sequence_length: int = 128, negative_prompt: str = "", variant: Optional[str] = None,
                        revision: Optional[str] = None, use_safetensors: Optional[bool] = None,
                        local_files_only: Optional[bool] = None) -> "SD3Model":
        """Load from a local diffusers directory or hub id (default SD3.5-medium). ``variant``, ``revision``,
        ``use_safetensors`` and ``local_files_only`` go to diffusers' ``from_pretrained`` (None: its default)."""
        from diffusers import StableDiffusion3Pipeline

        check_sizes("SD3", height=height, width=width, max_sequence_length=max_sequence_length)  # before loading
        check_text_length("SD3", max_sequence_length)
        options = loading_options(variant=variant, revision=revision, use_safetensors=use_safetensors,
                                  local_files_only=local_files_only)
        path = path or DEFAULT_PATH
        pipe = load_pipeline(StableDiffusion3Pipeline, path, dtype=dtype, device=device, family="sd3",
                             check=lambda tr, vae: check_checkpoint(tr, vae, height=height, width=width, path=path),
                             **options)
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

    def init_noise(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """x_0 [n, C, h, w] as ``StableDiffusion3Pipeline.prepare_latents`` draws it: ``randn`` in the pipeline dtype
        (``prompt_embeds.dtype``, the dtype the pipeline was loaded in), so a seed gives the pipeline's start; then
        upcast, as the latents and the SDE maths are fp32."""
        gen_device = generator.device if generator is not None else self.device
        x = torch.randn((n, *self.latent_shape), generator=generator, device=gen_device, dtype=self.dtype)
        return x.to(device=self.device, dtype=torch.float32)  # [n, C, h, w]

    def schedule(self, steps: int) -> Tensor:
        """The sigmas ``StableDiffusion3Pipeline`` sets on its scheduler (``set_timesteps(T)``, plus ``mu`` when the
        scheduler has ``use_dynamic_shifting``), every grid option of the scheduler included (``flow_match_sigmas``)."""
        cfg = self.pipe.scheduler.config
        mu = None
        if cfg.get("use_dynamic_shifting", False):
            # The pipeline's μ = calculate_shift((h/p)·(w/p)) with the scheduler's constants (its max_shift default 1.16)
            p = self.transformer.config.patch_size
            mu = scheduler_mu(cfg, (self.latent_shape[1] // p) * (self.latent_shape[2] // p), max_shift=1.16)
        return flow_match_sigmas(cfg, steps, mu=mu)  # [T+1]

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """v(x, σ | c) with CFG; x [B, C, h, w] fp32 → v [B, C, h, w] fp32."""
        b = x.shape[0]
        t = self._sigma_batch(sigma, b, x.device) * self.timestep_scale  # [B] model timestep σ·N in [0, N]
        cfg = uses_cfg(self.guidance_scale)
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
