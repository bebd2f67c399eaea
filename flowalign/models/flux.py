"""FLUX.1 adapter (diffusers ``FluxPipeline``) implementing ``FlowModel``.

* Latents are the pipeline's **packed** tokens [B, L, 4C] (2×2 patches of the [B, C, h, w] VAE latent,
  L = (h/2)·(w/2), 4C = 64 for FLUX.1), so ``velocity`` is one transformer call with no repacking;
  ``init_noise`` draws [n, C, h, w] in the pipeline dtype and packs it (the same noise as ``FluxPipeline`` for the
  same generator, upcast to fp32); ``decode`` unpacks, undoes the VAE shift/scale and decodes.
* Text: CLIP pooled embedding + T5 token embeddings (pipeline ``encode_prompt``); text ids are zeros,
  image ids are (0, row, col) per token.
* Guidance is distilled (FLUX.1-dev): the raw ``guidance_scale`` (e.g. 3.5) goes to the ``guidance``
  input (the transformer scales it by 1000 inside); one forward per step, no CFG batch doubling.
  Models without a guidance embedding (schnell) ignore ``guidance_scale``; setting one other than the adapter's
  default 3.5 or schnell's documented 0 logs a warning once per model, as it changes nothing.
* Timestep: σ itself in [0, 1] (the transformer multiplies by 1000 inside; METHODS.md §1.5); σ·N/1000 for a
  scheduler with num_train_timesteps N ≠ 1000, as FluxPipeline passes it.
* Schedule: the resolution-dependent dynamic shift ``flux_dynamic(T, L)`` with the scheduler's μ
  constants (METHODS.md §1.3); a scheduler without dynamic shifting (schnell) uses its static shift; the scheduler's
  ``time_shift_type``, ``shift_terminal`` and Karras / exponential / beta spacing are applied as diffusers does
  (``base.flow_match_sigmas``). A scheduler option flowalign does not reproduce (another scheduler class,
  ``invert_sigmas``, ``stochastic_sampling``) is refused when the model is loaded.
* Checked before loading (from the checkpoint's ``transformer/config.json`` and ``vae/config.json``; after loading
  when those cannot be read first): height/width multiples of 2·vae_scale_factor, a transformer that takes the
  packed VAE latent alone (image-conditioned variants such as FLUX.1 Fill, Canny and Depth take extra channels, and
  are refused), and ``max_sequence_length`` <= 512 (FluxPipeline's limit). ``default_steps`` is the pipeline's 28.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from flowalign.errors import UserError
from flowalign.models.base import (
    FlowAdapter, check_flow_match_scheduler, check_sizes, check_text_length, flow_match_sigmas,
    load_pipeline, loading_options, pipeline_modules, refuse_conditioned_variant, scheduler_mu, vae_scale_factor,
)
from flowalign.types import Cond

logger = logging.getLogger(__name__)

DEFAULT_PATH = "black-forest-labs/FLUX.1-dev"

# Published transformer architectures (the checkpoints' transformer/config.json), to count what a training step keeps
# without the weights (`flowalign bench train-memory --arch`, built by `base.build_transformer`).
TRANSFORMER = "FluxTransformer2DModel"  # the diffusers class these configs build
PIPELINE = "FluxPipeline"  # the diffusers pipeline of this family's checkpoints (model_index.json)
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "flux.1-dev": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                       guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    "flux.1-schnell": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                           num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                           guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
}


DEFAULT_GUIDANCE = 3.5  # FluxPipeline's guidance_scale


def check_checkpoint(transformer: Mapping[str, Any], vae: Mapping[str, Any], *, height: int, width: int,
                     path: str = "") -> None:
    """One-line ``UserError`` when the checkpoint (its transformer's and VAE's configs: the ``config.json`` files before
    loading, the modules' configs after) is not one FluxPipeline samples at ``height`` x ``width``: a transformer that
    takes more than the 2×2-packed VAE latent (FLUX.1 Fill: 384 input channels, Canny / Depth: 128, for 64 output
    channels; their pipelines concatenate the conditioning image's latents), or a size that is not a multiple of
    2·vae_scale_factor."""
    where = f"the checkpoint at {path!r}" if path else "the checkpoint"
    packed = 4 * int(vae["latent_channels"])
    refuse_conditioned_variant("flux", where, transformer, TRANSFORMER, packed,
                               f"text-to-image takes the {packed} of the packed VAE latent", "FLUX.1 Fill, Canny or Depth",
                               "pass a FluxPipeline checkpoint (FLUX.1-dev or -schnell)")
    multiple = 2 * vae_scale_factor(vae)
    if height % multiple or width % multiple:
        raise UserError(f"FLUX height/width must be multiples of {multiple}, got {height}x{width} (model.kwargs / "
                        f"--model-arg height=... width=...)")


def step_inputs(config: dict[str, Any], prompts: int, height: int, width: int, dtype: torch.dtype, *,
                device: Any = "meta", frames: int = 1, max_sequence_length: int = 512,
                guidance_scale: float = 3.5) -> dict[str, Tensor]:
    """The transformer inputs of one training forward of ``prompts`` prompts as ``FluxModel.velocity`` batches them:
    one row per prompt at any ``guidance_scale`` (guidance-distilled: the scale is an input, no second branch; schnell
    has none), 2×2-packed latent tokens, ``max_sequence_length`` T5 tokens (zeros)."""
    h2, w2 = height // 16, width // 16
    m = {"device": device, "dtype": dtype}
    guidance = torch.zeros(prompts, device=device) if config.get("guidance_embeds") else None  # [P]
    return dict(hidden_states=torch.zeros(prompts, h2 * w2, config["in_channels"], **m),  # [P, L, 4C]
                timestep=torch.zeros(prompts, device=device), guidance=guidance,  # [P]
                pooled_projections=torch.zeros(prompts, config["pooled_projection_dim"], **m),  # [P, 768]
                encoder_hidden_states=torch.zeros(prompts, max_sequence_length, config["joint_attention_dim"], **m),
                txt_ids=torch.zeros(max_sequence_length, 3, **m), img_ids=image_ids(h2, w2, device, dtype))  # [S|L, 3]


def pack(z: Tensor) -> Tensor:
    """[B, C, h, w] → [B, (h/2)(w/2), 4C] (2×2 patches, channel-major inside a patch, as FluxPipeline)."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: Tensor, h: int, w: int) -> Tensor:
    """Inverse of ``pack``: [B, L, 4C] → [B, C, h, w]."""
    b, _, c4 = x.shape
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h2: int, w2: int, device: Any, dtype: torch.dtype) -> Tensor:
    """Rotary position ids (0, row, col) of the packed image tokens, [h2·w2, 3]."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = torch.arange(h2)[:, None]
    ids[..., 2] = torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)


class FluxModel(FlowAdapter):
    # METHODS.md §3.7 (Flow-GRPO FLUX): r/α 64/128, the SD3 attention list plus both feed-forwards.
    lora_targets = (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    )
    lora_rank = 64
    lora_alpha = 128
    default_steps = 28  # FluxPipeline's num_inference_steps

    def __init__(self, pipe: Any, *, guidance_scale: float = DEFAULT_GUIDANCE, height: int = 512, width: int = 512,
                 max_sequence_length: int = 512, dtype: torch.dtype = torch.float32):
        check_sizes("FLUX", height=height, width=width, max_sequence_length=max_sequence_length)
        check_text_length("FLUX", max_sequence_length)
        check_checkpoint(pipe.transformer.config, pipe.vae.config, height=height, width=width,
                         path=getattr(pipe, "name_or_path", None) or "")
        vsf = pipe.vae_scale_factor
        check_flow_match_scheduler(pipe.scheduler, "flux")
        self.pipe = pipe
        self.guidance_embeds = bool(pipe.transformer.config.guidance_embeds)
        self._warned_guidance = False
        # FluxPipeline passes the scheduler's timestep σ·N divided by 1000 (N = num_train_timesteps, 1000 for FLUX.1).
        self.timestep_scale = float(pipe.scheduler.config.get("num_train_timesteps", 1000)) / 1000.0
        self.height, self.width = int(height), int(width)
        self.max_sequence_length = int(max_sequence_length)
        self.latent_hw = (height // vsf, width // vsf)  # unpacked VAE latent h, w
        self.channels = pipe.transformer.config.in_channels // 4  # VAE latent channels
        tokens = (self.latent_hw[0] // 2) * (self.latent_hw[1] // 2)
        super().__init__(
            pipe.transformer, guidance_scale=guidance_scale, dtype=dtype,
            latent_shape=(tokens, 4 * self.channels), components=pipeline_modules(pipe),
        )
        self._img_ids: Optional[Tensor] = None

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @guidance_scale.setter
    def guidance_scale(self, value: float) -> None:
        """Every scale is kept (results record it), but without a guidance embedding it changes nothing: say so once,
        unless it is the default (what a run gets without asking) or 0 (schnell's documented "no guidance")."""
        self._guidance_scale = value
        explicit = isinstance(value, (int, float)) and math.isfinite(value) and value > 0 \
            and value != DEFAULT_GUIDANCE
        if explicit and not self.guidance_embeds and not self._warned_guidance:
            self._warned_guidance = True
            logger.warning("flux: the checkpoint's transformer has no guidance embedding (guidance_embeds=false, like "
                           "FLUX.1-schnell): guidance scales have no effect on it, so guidance_scale=%g (as given, "
                           "or a config's default) samples the same images as any other and is only recorded", value)

    @classmethod
    def from_pretrained(cls, path: str = "", *, dtype: torch.dtype = torch.float32, device: Any = "cpu",
                        guidance_scale: float = DEFAULT_GUIDANCE, height: int = 512, width: int = 512,
                        max_sequence_length: int = 512, variant: Optional[str] = None, revision: Optional[str] = None,
                        use_safetensors: Optional[bool] = None, local_files_only: Optional[bool] = None) -> "FluxModel":
        """Load from a local diffusers directory or hub id (default FLUX.1-dev). ``variant``, ``revision``,
        ``use_safetensors`` and ``local_files_only`` go to diffusers' ``from_pretrained`` (None: its default)."""
        from diffusers import FluxPipeline

        check_sizes("FLUX", height=height, width=width, max_sequence_length=max_sequence_length)  # before loading
        check_text_length("FLUX", max_sequence_length)
        options = loading_options(variant=variant, revision=revision, use_safetensors=use_safetensors,
                                  local_files_only=local_files_only)
        path = path or DEFAULT_PATH
        pipe = load_pipeline(FluxPipeline, path, dtype=dtype, device=device, family="flux",
                             check=lambda tr, vae: check_checkpoint(tr, vae, height=height, width=width, path=path),
                             **options)
        return cls(pipe, guidance_scale=guidance_scale, height=height, width=width,
                   max_sequence_length=max_sequence_length, dtype=dtype)

    # ---- FlowModel ------------------------------------------------------------------------------

    def init_noise(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Noise as ``FluxPipeline.prepare_latents`` draws it: [n, C, h, w] in the pipeline dtype
        (``prompt_embeds.dtype``, the dtype the pipeline was loaded in), then packed, so a seed gives the pipeline's
        start; then upcast, as the latents and the SDE maths are fp32."""
        gen_device = generator.device if generator is not None else self.device
        z = torch.randn((n, self.channels, *self.latent_hw), generator=generator, device=gen_device, dtype=self.dtype)
        return pack(z).to(device=self.device, dtype=torch.float32)  # [n, L, 4C]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Cond:
        pe, pooled, _ = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=self.device,
                                                max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": pe, "pooled": pooled}  # [N, S, D], [N, P]

    def schedule(self, steps: int) -> Tensor:
        """The sigmas ``FluxPipeline`` sets: ``set_timesteps(sigmas=linspace(1, 1/T, T), mu=μ(L))`` with the
        scheduler's μ constants (a scheduler without dynamic shifting, FLUX.1-schnell, ignores μ and applies its static
        shift), every grid option of the scheduler included (``flow_match_sigmas``)."""
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        cfg = self.pipe.scheduler.config
        mu = scheduler_mu(cfg, self.latent_shape[0], max_shift=1.15)
        u = torch.linspace(1.0, 1.0 / steps, int(steps), dtype=torch.float64)  # [T] FluxPipeline's sigmas
        return flow_match_sigmas(cfg, steps, mu=mu, sigmas=u)  # [T+1]

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """v(x, σ | c); x [B, L, 4C] fp32 → v [B, L, 4C] fp32."""
        b = x.shape[0]
        sig = self._sigma_batch(sigma, b, x.device) * self.timestep_scale  # [B] σ·N/1000; ×1000 inside
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((b,), self.guidance_scale, device=x.device, dtype=torch.float32)  # [B]
        pe = cond["prompt_embeds"].to(self.dtype)
        txt_ids = torch.zeros(pe.shape[1], 3, device=x.device, dtype=self.dtype)  # [S, 3]
        if self._img_ids is None or self._img_ids.device != x.device:
            self._img_ids = image_ids(self.latent_hw[0] // 2, self.latent_hw[1] // 2, x.device, self.dtype)
        out = self.transformer(
            hidden_states=x.to(self.dtype), timestep=sig, guidance=guidance,
            pooled_projections=cond["pooled"].to(self.dtype), encoder_hidden_states=pe,
            txt_ids=txt_ids, img_ids=self._img_ids, return_dict=False,
        )[0]
        return out.float()  # [B, L, 4C]

    def decode(self, x: Tensor) -> Tensor:
        """Packed latents [B, L, 4C] → images [B, 3, H, W] in [0, 1] (fp32 VAE; differentiable)."""
        vae = self.pipe.vae
        z = unpack(x, *self.latent_hw).to(device=vae.device, dtype=vae.dtype)
        z = z / vae.config.scaling_factor + vae.config.shift_factor
        img = vae.decode(z, return_dict=False)[0]  # [B, 3, H, W] in [-1, 1]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] → packed latents (VAE mean)."""
        vae = self.pipe.vae
        z = vae.encode(images.to(device=vae.device, dtype=vae.dtype) * 2 - 1).latent_dist.mean
        return pack(((z - vae.config.shift_factor) * vae.config.scaling_factor).float())
