"""What every diffusers-backed model adapter shares: LoRA plumbing, device/dtype, noise, pipeline loading.

Nothing here is family-specific; ``sd3.py``, ``flux.py`` and ``wan.py`` subclass ``FlowAdapter`` and
implement ``encode`` / ``schedule`` / ``velocity`` / ``decode`` (the ``FlowModel`` protocol).

Precision contract: the transformer runs in the model dtype (fp16/bf16 on GPU, fp32 in tests), its
output is upcast and returned as float32 (kernel maths, log-probs and latents are fp32); the VAE
always runs in fp32; LoRA weights are fp32 master weights.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from flowalign.errors import UserError
from flowalign.models import lora as _lora

logger = logging.getLogger(__name__)


class FlowAdapter:
    """Base of the model adapters. Subclasses set ``lora_targets``, ``lora_rank``, ``lora_alpha``.

    ``guidance_scale`` is read at every ``velocity`` call, so it can be changed between training
    (e.g. 4.5) and evaluation without re-encoding prompts.
    """

    lora_targets: tuple[str, ...] = ()
    output_kind: str = "image"  # what ``decode`` returns: "image" [B,3,H,W] or "video" [B,F,3,H,W]
    lora_rank: int = 32
    lora_alpha: int = 64

    def __init__(
        self,
        transformer: nn.Module,
        *,
        guidance_scale: float,
        latent_shape: Sequence[int],
        dtype: torch.dtype,
        components: Optional[Mapping[str, nn.Module]] = None,
    ) -> None:
        self.transformer = transformer
        self.guidance_scale = float(guidance_scale)
        self.latent_shape = tuple(int(s) for s in latent_shape)  # per sample, without the batch dim
        self._dtype = dtype
        self.components: dict[str, nn.Module] = {"transformer": transformer, **dict(components or {})}

    # ---- device / dtype -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's compute dtype (LoRA master weights stay fp32 regardless)."""
        return self._dtype

    def to(self, device: Any) -> "FlowAdapter":
        for module in self.components.values():
            module.to(device)
        return self

    # ---- noise ----------------------------------------------------------------------------------

    def init_noise(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """x_0 ~ N(0, I), fp32, [n, *latent_shape]; drawn on the generator's device, then moved."""
        gen_device = generator.device if generator is not None else self.device
        x = torch.randn((n, *self.latent_shape), generator=generator, device=gen_device, dtype=torch.float32)
        return x.to(self.device)  # [n, *latent]

    # ---- LoRA (delegates to flowalign.models.lora) ---------------------------------------------

    def add_lora(
        self,
        rank: Optional[int] = None,
        alpha: Optional[float] = None,
        *,
        targets: Optional[Sequence[str]] = None,
        init: str | bool = "gaussian",
    ) -> list[nn.Parameter]:
        """Wrap the transformer with LoRA (family defaults from METHODS.md §3.7); returns the trainable tensors."""
        return _lora.add_lora(
            self.transformer,
            tuple(targets) if targets is not None else self.lora_targets,
            self.lora_rank if rank is None else rank,
            self.lora_alpha if alpha is None else alpha,
            init=init,
        )

    def reference(self) -> contextlib.AbstractContextManager:
        """Context in which ``velocity`` is the base (reference) model: the adapter is disabled, not copied."""
        return _lora.lora_disabled(self.transformer)

    def lora_parameters(self) -> list[nn.Parameter]:
        return _lora.lora_parameters(self.transformer)

    def lora_state_dict(self) -> dict[str, Tensor]:
        return _lora.lora_state_dict(self.transformer)

    def save_lora(self, directory) -> Path:
        """Write ``directory/pytorch_lora_weights.safetensors`` (loads with diffusers' ``pipe.load_lora_weights``)."""
        return _lora.save_lora(self.transformer, directory)

    def load_lora(self, directory) -> None:
        """Load a saved LoRA (bitwise); adds the adapter first if the transformer has none."""
        _lora.load_lora(self.transformer, directory)

    # ---- small shared helpers for subclasses ----------------------------------------------------

    @staticmethod
    def _sigma_batch(sigma: Tensor, batch: int, device: torch.device) -> Tensor:
        """σ as float32 [B] (accepts a 0-d tensor, a float or [B])."""
        s = torch.as_tensor(sigma, dtype=torch.float32, device=device).reshape(-1)
        return s.expand(batch) if s.numel() == 1 else s  # [B]


def load_pipeline(pipeline_cls: Any, path: str, *, dtype: torch.dtype, device: Any, family: str, **kwargs: Any):
    """``pipeline_cls.from_pretrained(path)`` in ``dtype`` with the VAE in fp32, every module frozen and in eval mode.

    ``path`` is a local diffusers directory or a hub id (offline runs need a local directory).
    """
    import diffusers.pipelines.pipeline_utils as pu

    # Per-component dtypes ({"default": dtype, "vae": fp32}) load the VAE directly in fp32. diffusers renamed
    # ``torch_dtype`` to ``dtype`` (the old name warns); older versions only know torch_dtype.
    dtype_key = "dtype" if hasattr(pu, "_resolve_dtype") else "torch_dtype"
    dtypes = {"default": dtype, "vae": torch.float32}
    try:
        pipe = pipeline_cls.from_pretrained(path, **{dtype_key: dtypes}, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        msg = f"cannot load the {family} pipeline from {path!r} ({first}); pass a local diffusers directory"
        raise UserError(msg) from e
    pipe.set_progress_bar_config(disable=True)
    if getattr(pipe, "vae", None) is not None and pipe.vae.dtype != torch.float32:
        pipe.vae.to(torch.float32)  # VAE in fp32 (METHODS.md §3.7, REWARDS_AND_EVAL.md §4.1)
    pipe.to(device)
    for module in pipe.components.values():
        if isinstance(module, nn.Module):
            module.requires_grad_(False)
            module.eval()
    return pipe


def pipeline_modules(pipe: Any) -> dict[str, nn.Module]:
    """Every nn.Module component of a diffusers pipeline, by name."""
    return {k: v for k, v in pipe.components.items() if isinstance(v, nn.Module)}
