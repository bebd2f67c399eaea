"""Wan 2.1 text-to-video adapter (diffusers ``WanPipeline``) implementing ``FlowModel`` (REWARDS_AND_EVAL.md §4.1).

* Latents: [B, 16, F′, H/8, W/8] with F′ = (F − 1)/4 + 1, normalised per channel by the VAE config's
  ``latents_mean`` / ``latents_std`` (the pipeline's latent space).
* Text: UMT5 last hidden states, zero-padded to ``max_sequence_length`` (pipeline ``encode_prompt``);
  negative-prompt CFG, ``encode`` returns both branches per prompt.
* Velocity: CFG v = v_u + w·(v_c − v_u) with both branches in one batch-doubled forward [uncond, cond]
  (the pipeline runs two forwards; the result agrees to float rounding); timestep = N·σ, N = the scheduler's
  num_train_timesteps = 1000.
* Schedule: ``shifted_linear(T, flow_shift)`` (METHODS.md §1.4) replaces the pipeline's UniPC scheduler;
  ``flow_shift`` defaults to the scheduler config's (3.0 for 480p, 5.0 for 720p; ``shift`` for a
  FlowMatchEulerDiscreteScheduler); one that is not a finite number > 0 is refused. A scheduler whose options
  reshape its grid beyond that shift (``SCHEDULER_EXPECTED``: Karras / exponential / beta sigmas, dynamic shifting,
  ``shift_terminal``, non-flow sigmas) is refused when the model is loaded.
* Decode: fp32 VAE → [B, F, 3, H, W] in [0, 1].
* Checked before loading (from the checkpoint's ``transformer/config.json`` and ``vae/config.json``; after loading
  when those cannot be read first): num_frames = k·(temporal VAE factor) + 1, height/width multiples of the spatial
  factor times the patch, and a transformer that takes the VAE latent alone (image-to-video checkpoints, whose
  transformer also takes the conditioning frames' latents and mask, are refused). ``default_steps`` is WanPipeline's 50.
Wan 2.2 two-expert pipelines (``transformer_2``) are not supported.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from flowalign.errors import UserError
from flowalign.models.base import (
    FlowAdapter, check_shift, check_sizes, config_value, load_pipeline, loading_options, pipeline_modules,
    refuse_conditioned_variant, refuse_scheduler_options, uses_cfg,
)
from flowalign.types import Cond

DEFAULT_PATH = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"

# Published transformer architectures (the checkpoints' transformer/config.json), to count what a training step keeps
# without the weights (`flowalign bench train-memory --arch`, built by `base.build_transformer`).
TRANSFORMER = "WanTransformer3DModel"  # the diffusers class these configs build
PIPELINE = "WanPipeline"  # the diffusers pipeline of this family's checkpoints (model_index.json)
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "wan2.1-1.3b": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", eps=1e-6),
    "wan2.1-14b": dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                       out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                       qk_norm="rms_norm_across_heads", eps=1e-6),
}


def step_inputs(config: dict[str, Any], prompts: int, height: int, width: int, dtype: torch.dtype, *,
                device: Any = "meta", frames: int = 1, max_sequence_length: int = 512,
                guidance_scale: float = 5.0) -> dict[str, Tensor]:
    """The transformer inputs of one training forward of ``prompts`` prompts as ``WanModel.velocity`` batches them:
    both CFG branches (R = 2·prompts rows) when ``guidance_scale`` > 1, else the conditional branch alone
    (R = prompts), (frames − 1)/4 + 1 latent frames, ``max_sequence_length`` UMT5 tokens (zeros)."""
    rows = 2 * prompts if uses_cfg(guidance_scale) else prompts
    m = {"device": device, "dtype": dtype}
    lat = (rows, config["in_channels"], (frames - 1) // 4 + 1, height // 8, width // 8)  # [R, C, F', h, w]
    return dict(hidden_states=torch.zeros(lat, **m), timestep=torch.zeros(rows, device=device),  # ..., [R]
                encoder_hidden_states=torch.zeros(rows, max_sequence_length, config["text_dim"], **m))  # [R, S, D]


# The grid is flowalign's shifted_linear(T, flow_shift), not the scheduler's, and the step is flowalign's kernel, so the
# scheduler's solver options (UniPC's order, corrector, final sigma; Euler's stochastic_sampling) do not apply. These
# options would make the checkpoint's own schedule something other than a flow grid shifted by flow_shift (or its
# timesteps something other than N·σ), so a scheduler that sets them is refused at load time.
SCHEDULER_EXPECTED = {
    "prediction_type": "flow_prediction",  # UniPC / DPM-Solver: a flow-matching model at all
    "use_flow_sigmas": True,
    "use_dynamic_shifting": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "invert_sigmas": False,
}


def check_checkpoint(transformer: Mapping[str, Any], vae: Mapping[str, Any], *, height: int, width: int,
                     num_frames: int, path: str = "") -> None:
    """One-line ``UserError`` when the checkpoint (its transformer's and VAE's configs: the ``config.json`` files before
    loading, the modules' configs after) is not one WanPipeline samples at ``num_frames`` x ``height`` x ``width``:
    a transformer that takes more than the VAE latent (Wan2.1 I2V / FLF2V: 36 input channels for the VAE's z_dim 16,
    the conditioning video's latents and mask concatenated), or sizes the VAE and patch do not divide."""
    where = f"the checkpoint at {path!r}" if path else "the checkpoint"
    z_dim = int(config_value(vae, "z_dim", "AutoencoderKLWan"))
    refuse_conditioned_variant("wan", where, transformer, TRANSFORMER, z_dim,
                               f"text-to-video takes the VAE's z_dim={z_dim}", "Wan2.1 I2V or FLF2V",
                               "pass a WanPipeline (T2V) checkpoint such as Wan2.1-T2V-1.3B")
    tsf = int(config_value(vae, "scale_factor_temporal", "AutoencoderKLWan"))
    ssf = int(config_value(vae, "scale_factor_spatial", "AutoencoderKLWan"))
    patch = config_value(transformer, "patch_size", TRANSFORMER)
    if (num_frames - 1) % tsf:
        raise UserError(f"Wan num_frames must be {tsf}k + 1 (e.g. 33 or 81), got {num_frames} (model.kwargs / "
                        f"--model-arg num_frames=...)")
    if height % (ssf * patch[1]) or width % (ssf * patch[2]):
        raise UserError(f"Wan height/width must be multiples of {ssf * patch[1]}, got {height}x{width} (model.kwargs / "
                        f"--model-arg height=... width=...)")


FLOW_SHIFT_FIX = "use 3.0 for 480p or 5.0 for 720p (model.kwargs.flow_shift / --model-arg flow_shift=3.0)"


class WanModel(FlowAdapter):
    # METHODS.md §3.7: r/α 32/64 on the attention projections (self- and cross-attention).
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    output_kind = "video"  # decode → [B, F, 3, H, W]; image rewards score it through rewards.video.for_outputs
    lora_rank = 32
    lora_alpha = 64
    default_steps = 50  # WanPipeline's num_inference_steps
    fps = 16.0  # Wan 2.1 generates at 16 fps (REWARDS_AND_EVAL.md §4.1): the frame rate its GIF grids play at

    def __init__(self, pipe: Any, *, guidance_scale: float = 5.0, height: int = 480, width: int = 832,
                 num_frames: int = 81, max_sequence_length: int = 512, negative_prompt: str = "",
                 flow_shift: Optional[float] = None, dtype: torch.dtype = torch.float32):
        if getattr(pipe, "transformer_2", None) is not None:
            raise UserError("Wan 2.2 two-expert pipelines (transformer_2) are not supported; use a Wan 2.1 model")
        check_sizes("Wan", height=height, width=width, num_frames=num_frames, max_sequence_length=max_sequence_length)
        vae_cfg = pipe.vae.config
        check_checkpoint(pipe.transformer.config, vae_cfg, height=height, width=width, num_frames=num_frames,
                         path=getattr(pipe, "name_or_path", None) or "")
        tsf, ssf = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        self.pipe = pipe
        self.height, self.width, self.num_frames = int(height), int(width), int(num_frames)
        self.max_sequence_length = int(max_sequence_length)
        self.negative_prompt = negative_prompt
        refuse_scheduler_options(pipe.scheduler, "wan", SCHEDULER_EXPECTED)
        sched = pipe.scheduler.config
        # The pipeline's timestep is the scheduler's σ·N (N = num_train_timesteps, 1000 for Wan 2.1).
        self.timestep_scale = float(sched.get("num_train_timesteps", 1000))
        if flow_shift is None:
            key = "flow_shift" if "flow_shift" in sched else "shift"
            flow_shift = check_shift(sched.get(key, 3.0), f"wan: {key}={sched.get(key)!r} in the checkpoint's "
                                     "scheduler/scheduler_config.json", FLOW_SHIFT_FIX)
        self.flow_shift = check_shift(flow_shift, f"wan: flow_shift={flow_shift!r}", FLOW_SHIFT_FIX)
        self._mean = torch.tensor(vae_cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)  # [1, C, 1, 1, 1]
        self._std = torch.tensor(vae_cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)  # [1, C, 1, 1, 1]
        latent_shape = (vae_cfg.z_dim, (num_frames - 1) // tsf + 1, height // ssf, width // ssf)
        super().__init__(pipe.transformer, guidance_scale=guidance_scale, dtype=dtype, latent_shape=latent_shape,
                         components=pipeline_modules(pipe))

    @classmethod
    def from_pretrained(cls, path: str = "", *, dtype: torch.dtype = torch.float32, device: Any = "cpu",
                        guidance_scale: float = 5.0, height: int = 480, width: int = 832, num_frames: int = 81,
                        max_sequence_length: int = 512, negative_prompt: str = "",
                        flow_shift: Optional[float] = None, variant: Optional[str] = None,
                        revision: Optional[str] = None, use_safetensors: Optional[bool] = None,
                        local_files_only: Optional[bool] = None) -> "WanModel":
        """Load from a local diffusers directory or hub id (default Wan2.1-T2V-1.3B). ``variant``, ``revision``,
        ``use_safetensors`` and ``local_files_only`` go to diffusers' ``from_pretrained`` (None: its default)."""
        from diffusers import WanPipeline

        # the user's values are checked before anything loads
        check_sizes("Wan", height=height, width=width, num_frames=num_frames, max_sequence_length=max_sequence_length)
        if flow_shift is not None:
            check_shift(flow_shift, f"wan: flow_shift={flow_shift!r}", FLOW_SHIFT_FIX)
        options = loading_options(variant=variant, revision=revision, use_safetensors=use_safetensors,
                                  local_files_only=local_files_only)
        path = path or DEFAULT_PATH
        pipe = load_pipeline(WanPipeline, path, dtype=dtype, device=device, family="wan",
                             check=lambda tr, vae: check_checkpoint(tr, vae, height=height, width=width,
                                                                    num_frames=num_frames, path=path), **options)
        return cls(pipe, guidance_scale=guidance_scale, height=height, width=width, num_frames=num_frames,
                   max_sequence_length=max_sequence_length, negative_prompt=negative_prompt,
                   flow_shift=flow_shift, dtype=dtype)

    # ---- FlowModel ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Cond:
        prompts = list(prompts)
        pe, neg_pe = self.pipe.encode_prompt(
            prompt=prompts, negative_prompt=[self.negative_prompt] * len(prompts), do_classifier_free_guidance=True,
            max_sequence_length=self.max_sequence_length, device=self.device,
        )
        return {"prompt_embeds": pe, "neg_prompt_embeds": neg_pe}  # [N, S, D] each

    def schedule(self, steps: int) -> Tensor:
        from flowalign.samplers.schedules import shifted_linear

        return shifted_linear(steps, self.flow_shift)  # [T+1]

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """v(x, σ | c) with CFG; x [B, C, F′, h, w] fp32 → v of the same shape, fp32."""
        b = x.shape[0]
        t = self._sigma_batch(sigma, b, x.device) * self.timestep_scale  # [B] model timestep σ·N in [0, N]
        cfg = uses_cfg(self.guidance_scale)
        h, enc = x.to(self.dtype), cond["prompt_embeds"]
        if cfg:
            h, t = torch.cat([h, h]), torch.cat([t, t])  # [2B, ...] = [uncond, cond]
            enc = torch.cat([cond["neg_prompt_embeds"], enc])
        out = self.transformer(hidden_states=h, timestep=t, encoder_hidden_states=enc.to(self.dtype),
                               return_dict=False)[0].float()
        if not cfg:
            return out
        v_u, v_c = out.chunk(2)
        return v_u + self.guidance_scale * (v_c - v_u)  # [B, C, F′, h, w]

    def decode(self, x: Tensor) -> Tensor:
        """Latents [B, C, F′, h, w] → video [B, F, 3, H, W] in [0, 1] (fp32 VAE; differentiable)."""
        vae = self.pipe.vae
        z = x.float() * self._std.to(x.device) + self._mean.to(x.device)  # z_raw = z·std + mean
        video = vae.decode(z.to(device=vae.device, dtype=vae.dtype), return_dict=False)[0]  # [B, 3, F, H, W]
        return (video.float().permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1)  # [B, F, 3, H, W]

    def encode_videos(self, videos: Tensor) -> Tensor:
        """Videos [B, F, 3, H, W] in [0, 1] → normalised latents (VAE mean)."""
        vae = self.pipe.vae
        v = videos.permute(0, 2, 1, 3, 4).to(device=vae.device, dtype=vae.dtype) * 2 - 1  # [B, 3, F, H, W]
        z = vae.encode(v).latent_dist.mean.float()
        return (z - self._mean.to(z.device)) / self._std.to(z.device)
