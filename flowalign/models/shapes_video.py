"""The built-in shapes video model: a small pixel-space Wan text-to-video flow model (SHAPES_WORLD.md §6).

The shapes model of :mod:`flowalign.models.shapes` in motion: the same word-level text encoder (over the motion
grammar's vocabulary, :func:`flowalign.shapes.motion.vocabulary`), classifier-free guidance with the empty prompt,
x-prediction and checkpoint layout, with the denoiser swapped for diffusers' ``WanTransformer3DModel`` (the Wan 2.1
DiT: 3-D RoPE over (frame, row, column) patches, text cross-attention; LoRA targets as for Wan) working on pixels.

- Data x [B, 3, F, H, W] ∈ [-1, 1] (Wan's latent layout, channels first); ``decode`` returns videos
  [B, F, 3, H, W] in [0, 1] (``output_kind = "video"``: image rewards score them frame by frame through
  ``rewards.video.for_outputs``; ``shapes_motion_*`` score the motion).
- Timestep 1000·σ, as Wan's pipeline passes σ·N.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor, nn

from flowalign.errors import UserError
from flowalign.models.shapes import ShapesModel, _Refiner, config_from_dict, overlap_padding

WAN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class ShapesVideoConfig:
    """Architecture, vocabulary and sampling defaults of a shapes video model (saved as ``config.json``)."""

    vocab: list[str] = field(default_factory=list)  # motion-grammar words (special tokens are prepended)
    frames: int = 8
    image_size: int = 32
    channels: int = 3
    # denoiser (WanTransformer3DModel): patches of temporal_patch frames × patch_size²
    patch_size: int = 4
    temporal_patch: int = 1
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    ffn_dim: int = 512
    freq_dim: int = 64
    prediction: str = "x"  # "v" (velocity) or "x" (clean video; v derived, as the image shapes model)
    x_min_sigma: float = 0.05
    # text encoder
    text_dim: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_len: int = 16  # the motion grammar's longest prompt has 16 words
    pooled_dim: int = 128  # the text encoder's pooled vector (read only with pooled_conditioning)
    patch_embed_kernel: int = 0  # >patch_size: overlapping spatial patch embedding (0 = Wan's p×p, stride p)
    refiner_channels: int = 0  # >0: a residual per-frame 3×3-conv block on the output (0 = none)
    pooled_conditioning: bool = False  # add an MLP of the pooled text vector to Wan's timestep embedding (adaLN)
    # sampling defaults
    shift: float = 1.0
    guidance_scale: float = 4.0
    sample_steps: int = 12
    # LoRA defaults
    lora_rank: int = 8
    lora_alpha: float = 16.0

    def transformer_config(self) -> dict[str, Any]:
        return dict(patch_size=(self.temporal_patch, self.patch_size, self.patch_size), num_attention_heads=self.num_heads,
                    attention_head_dim=self.head_dim, in_channels=self.channels, out_channels=self.channels,
                    text_dim=self.text_dim, freq_dim=self.freq_dim, ffn_dim=self.ffn_dim, num_layers=self.num_layers,
                    rope_max_seq_len=64)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShapesVideoConfig":
        cfg = config_from_dict(cls, d, "shapes video model")
        overlap_padding(cfg.patch_embed_kernel, cfg.patch_size)  # a one-line error for a kernel that cannot overlap
        if cfg.image_size % cfg.patch_size or cfg.frames % cfg.temporal_patch:
            raise UserError(f"image_size={cfg.image_size} must be a multiple of patch_size={cfg.patch_size} and "
                            f"frames={cfg.frames} of temporal_patch={cfg.temporal_patch}")
        return cfg


class _PooledTimeEmbedder(nn.Module):
    """Wan's timestep MLP plus an MLP of the pooled text vector: temb = MLP_t(t) + MLP_p(pooled), the global
    conditioning that SD3's MMDiT adds to its adaLN (Esser et al. 2024, §3, "pooled text representation"). Wan reads
    text only through cross-attention; a model this small binds colour, shape and direction to the prompt much faster
    through adaLN. ``pooled`` [B, P] is set by :meth:`ShapesVideoModel._net` around each forward."""

    def __init__(self, inner: nn.Module, pooled_dim: int, dim: int):
        super().__init__()
        self.inner = inner
        self.pooled_mlp = nn.Sequential(nn.Linear(pooled_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.pooled: Optional[Tensor] = None

    def forward(self, t: Tensor) -> Tensor:
        temb = self.inner(t)  # [B, D]
        if self.pooled is None:
            raise RuntimeError("the pooled text vector was not set before the Wan forward")
        return temb + self.pooled_mlp(self.pooled.to(temb.dtype))  # [B, D]


class ShapesVideoModel(ShapesModel):
    """The shapes text-to-video flow model (``FlowModel``, DESIGN.md §3): components {"transformer":
    WanTransformer3DModel, "text_encoder": ShapesTextEncoder}; LoRA wraps the transformer's attention projections."""

    CONFIG = ShapesVideoConfig
    ASSET = "shapes_video"
    GRAMMAR = "flowalign.shapes.motion"  # the motion grammar: its vocabulary() and parse()
    default_rewards = ("shapes_motion_strict", "shapes_motion_partial")  # its verifier: verdict, partial credit
    default_prompts = "shapes-motion-bench"
    PRETRAIN_CONFIG = "configs/shapes_video_pretrain.yaml"  # stage 1 of the recipe that made the shipped model
    LORA_TARGETS = WAN_LORA_TARGETS
    WEIGHT_PREFIX = "transformer.blocks."  # keys only this family's model.safetensors has (Wan blocks)
    NAMES = ("the shapes video model", "the shapes motion grammar")
    output_kind = "video"
    fps = 8.0  # nothing sets the shapes world's frame rate (SHAPES_WORLD.md §6): 8 frames play as one second

    @staticmethod
    def _latent_shape(config: Any) -> tuple[int, ...]:
        return (config.channels, config.frames, config.image_size, config.image_size)  # [C, F, H, W]

    def _build(self, config: Any) -> tuple[nn.Module, dict[str, nn.Module]]:
        from diffusers import WanTransformer3DModel

        transformer = WanTransformer3DModel(**config.transformer_config())
        k, p, tp = int(config.patch_embed_kernel), int(config.patch_size), int(config.temporal_patch)
        pad = overlap_padding(k, p)
        if pad:
            # the image model's overlapping patch embedding, per frame: each token also sees its neighbours'
            # border pixels; the same (frame, row, column) token grid (stride (tp, p, p), spatial padding (k − p)/2)
            old = transformer.patch_embedding
            transformer.patch_embedding = nn.Conv3d(old.in_channels, old.out_channels, (tp, k, k), stride=(tp, p, p),
                                                    padding=(0, pad, pad))
        self.pooled_embedder: Optional[_PooledTimeEmbedder] = None
        if config.pooled_conditioning:
            ce = transformer.condition_embedder
            self.pooled_embedder = _PooledTimeEmbedder(ce.time_embedder, config.pooled_dim,
                                                       config.num_heads * config.head_dim)
            ce.time_embedder = self.pooled_embedder
        comps: dict[str, nn.Module] = {}
        self.refiner: Optional[nn.Module] = None
        if config.refiner_channels:
            self.refiner = _Refiner(config.channels, config.refiner_channels, per_frame=True)
            comps["refiner"] = self.refiner
        return transformer, comps


    def _net(self, x: Tensor, sigma: Tensor, hidden: Tensor, pooled: Optional[Tensor]) -> Tensor:
        if self.pooled_embedder is not None:
            self.pooled_embedder.pooled = pooled
        try:
            out = self.transformer(hidden_states=x.to(self.dtype), timestep=1000.0 * sigma.float(),
                                   encoder_hidden_states=hidden.to(self.dtype), return_dict=False)[0]
        finally:
            if self.pooled_embedder is not None:
                self.pooled_embedder.pooled = None
        if self.refiner is not None:
            out = out + self.refiner(out)  # [B, C, F, H, W]
        return out.float()  # [B, C, F, H, W]

    def output_size(self) -> dict[str, int]:
        return {**super().output_size(), "num_frames": self.config.frames}

    def decode(self, x: Tensor) -> Tensor:
        """x [B, 3, F, H, W] → videos [B, F, 3, H, W] in [0, 1]."""
        return ((x.float().permute(0, 2, 1, 3, 4) + 1.0) / 2.0).clamp(0.0, 1.0)

    def encode_images(self, images: Tensor) -> Tensor:
        """Videos [B, F, 3, H, W] in [0, 1] → data x [B, 3, F, H, W] ∈ [-1, 1] (the inverse of ``decode``)."""
        if images.dim() != 5:
            raise ValueError(f"the shapes video model encodes videos [B, F, 3, H, W], got shape {tuple(images.shape)}")
        return images.to(self.device, self.dtype).permute(0, 2, 1, 3, 4) * 2.0 - 1.0
