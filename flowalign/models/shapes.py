"""The built-in shapes model: a small pixel-space MMDiT text-to-image flow model (SHAPES_WORLD.md §4).

- Pixel space, no VAE: images in [0, 1] are scaled to x ∈ [-1, 1]; ``decode`` maps back and clamps.
- Denoiser: diffusers' ``SD3Transformer2DModel`` with a small config (the same MMDiT code, LoRA target
  names and timestep handling as SD3.5: the transformer receives ``timestep = 1000·σ``).
- Text encoder: a word-level tokenizer over the grammar's vocabulary (+ ``<pad>``, ``<unk>``, ``<empty>``),
  a learned embedding and a small ``nn.TransformerEncoder`` → ``encoder_hidden_states`` [B, L, D] and a
  pooled vector [B, P]; trained jointly with the denoiser. The empty prompt is the unconditional branch
  (caption dropout at pretraining), so classifier-free guidance works as for SD3.

The checkpoint is one ``model.safetensors`` (keys ``transformer.*`` and ``text_encoder.*``) and a
``config.json`` (architecture, vocabulary and sampling defaults); the shipped one lives in the package
data ``flowalign/assets/shapes`` and loads with no network.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from flowalign.errors import UserError, first_line
from flowalign.models.base import FlowAdapter, check_shift, path_hint
from flowalign.shapes.grammar import unknown_word
from flowalign.types import Cond

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<unk>", "<empty>")
PAD, UNK, EMPTY = 0, 1, 2
SHAPES_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass
class ShapesConfig:
    """Architecture, vocabulary and sampling defaults of a shapes model (saved as ``config.json``)."""

    vocab: list[str] = field(default_factory=list)  # grammar words (special tokens are prepended)
    image_size: int = 32  # H = W in pixels
    channels: int = 3
    # denoiser (SD3Transformer2DModel)
    patch_size: int = 4
    num_layers: int = 6
    num_heads: int = 4
    head_dim: int = 32
    patch_embed_kernel: int = 0  # >patch_size: overlapping patch-embedding conv (0 = the standard p×p, stride p)
    refiner_channels: int = 0  # >0: a residual 3×3-conv block on the unpatchified output (U-ViT style; 0 = none)
    prediction: str = "v"  # what the transformer outputs: "v" (velocity) or "x" (clean image; v derived, JiT)
    x_min_sigma: float = 0.05  # with prediction "x": v = (x_σ − x̂)/max(σ, x_min_sigma)
    # text encoder
    text_dim: int = 128  # = joint_attention_dim of the transformer
    text_layers: int = 2
    text_heads: int = 4
    max_len: int = 12  # prompts are padded to this many tokens (the grammar's longest prompt has 10 words)
    pooled_dim: int = 128
    # sampling defaults
    shift: float = 1.0  # shifted_linear(steps, shift)
    guidance_scale: float = 4.0
    sample_steps: int = 12
    # LoRA defaults
    lora_rank: int = 8
    lora_alpha: float = 16.0

    def transformer_config(self) -> dict[str, Any]:
        return dict(sample_size=self.image_size, patch_size=self.patch_size, in_channels=self.channels,
                    out_channels=self.channels, num_layers=self.num_layers, attention_head_dim=self.head_dim,
                    num_attention_heads=self.num_heads, joint_attention_dim=self.text_dim,
                    caption_projection_dim=self.num_heads * self.head_dim, pooled_projection_dim=self.pooled_dim,
                    pos_embed_max_size=self.image_size // self.patch_size)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShapesConfig":
        return config_from_dict(cls, d, "shapes model")


def config_from_dict(cls: Any, d: dict[str, Any], what: str) -> Any:
    """``cls(**d)`` for a config dataclass; a one-line ``UserError`` naming unknown keys."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"unknown {what} config key(s) {unknown}; known: {sorted(known)}")
    return cls(**d)


class ShapesTextEncoder(nn.Module):
    """Word-level text encoder: tokens → embedding + positions → pre-LN transformer → hidden states, pooled.

    The pooled vector is the masked mean of the final hidden states through a linear projection.
    """

    def __init__(self, vocab: Sequence[str], dim: int = 128, layers: int = 2, heads: int = 4, max_len: int = 12,
                 pooled_dim: int = 128, name: str = "the shapes model", grammar: str = "the shapes grammar"):
        super().__init__()
        self.tokens = list(SPECIAL_TOKENS) + [w for w in vocab if w not in SPECIAL_TOKENS]
        self.index = {w: i for i, w in enumerate(self.tokens)}
        self.max_len = max_len
        self.name, self.grammar = name, grammar  # for the error lines: whose tokenizer, which grammar
        self.embed = nn.Embedding(len(self.tokens), dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.pool = nn.Linear(dim, pooled_dim)
        nn.init.normal_(self.embed.weight, std=0.02)

    def words(self, prompt: str) -> list[str]:
        return prompt.lower().replace(",", " ").replace(".", " ").split()

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids [B, L] and a validity mask [B, L]; raises UserError naming any unknown word."""
        ids = torch.full((len(prompts), self.max_len), PAD, dtype=torch.long)  # [B, L]
        mask = torch.zeros(len(prompts), self.max_len, dtype=torch.bool)  # [B, L]
        for i, p in enumerate(prompts):
            words = self.words(p)
            if not words:
                toks = [EMPTY]
            else:
                toks = []
                for w in words:
                    if w not in self.index or w in SPECIAL_TOKENS:
                        known = self.tokens[len(SPECIAL_TOKENS):]
                        raise UserError(f"prompt {p!r}: {unknown_word(w, known)} ({self.name} knows only "
                                        f"{self.grammar}: {', '.join(known)})")
                    toks.append(self.index[w])
            if len(toks) > self.max_len:
                raise UserError(f"prompt {p!r} has {len(toks)} words; {self.name} takes at most {self.max_len}")
            ids[i, : len(toks)] = torch.tensor(toks)
            mask[i, : len(toks)] = True
        return ids, mask

    def forward(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        h = self.embed(ids) + self.pos[: ids.shape[1]]  # [B, L, D]
        h = self.encoder(h, src_key_padding_mask=~mask)  # [B, L, D]
        h = self.norm(h)
        m = mask.to(h.dtype).unsqueeze(-1)  # [B, L, 1]
        pooled = self.pool((h * m).sum(1) / m.sum(1).clamp_min(1.0))  # [B, P]
        return h, pooled


class _Refiner(nn.Module):
    """conv3×3 → GELU → conv3×3 on the transformer's pixel output, added residually; zero-initialised so it
    starts as the identity. Smooths the patch-grid artifacts of small ViT denoisers (U-ViT, Bao et al. 2023, §3)."""

    def __init__(self, channels: int, hidden: int, per_frame: bool = False):
        super().__init__()
        # per_frame: x [B, C, F, H, W], a (1, 3, 3) kernel that refines every frame on its own (the video model)
        conv, k, pad = (nn.Conv3d, (1, 3, 3), (0, 1, 1)) if per_frame else (nn.Conv2d, 3, 1)
        self.conv1 = conv(channels, hidden, k, padding=pad)
        self.conv2 = conv(hidden, channels, k, padding=pad)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(nn.functional.gelu(self.conv1(x)))


def overlap_padding(kernel: int, patch: int) -> int:
    """Spatial padding (k − p)/2 of an overlapping k×k, stride-p patch embedding (same token grid as p×p); 0 when
    ``kernel`` is 0 or p (the standard embedding). One-line ``UserError`` unless k = p + an even number."""
    k, p = int(kernel), int(patch)
    if not k or k == p:
        return 0
    if k < p or (k - p) % 2:
        raise UserError(f"patch_embed_kernel must be patch_size + an even number, got {k} for patch {p}")
    return (k - p) // 2


def _asset_dir(name: str = "shapes") -> Path:
    from importlib import resources

    return Path(str(resources.files("flowalign") / "assets" / name))


class ShapesModel(FlowAdapter):
    """The shapes text-to-image flow model, implementing ``FlowModel`` (DESIGN.md §3).

    ``components`` = {"transformer": SD3Transformer2DModel, "text_encoder": ShapesTextEncoder}; both are
    trained at pretraining, LoRA (``add_lora``) wraps only the transformer. ``velocity`` applies
    classifier-free guidance by batch doubling with ``self.guidance_scale`` (v = v_u + w·(v_c − v_u),
    METHODS.md §0.1); at w = 1 it runs one conditional forward.
    """

    CONFIG: Any = ShapesConfig  # the config class (a subclass family swaps it, e.g. the video shapes model)
    ASSET = "shapes"  # the shipped checkpoint: flowalign/assets/<ASSET>
    GRAMMAR = "flowalign.shapes.grammar"  # the module whose vocabulary() and parse() define this family's prompts
    # the rewards eval and steer use when given none: the family's exact verifier, (pass/fail verdict, partial credit);
    # the diffusers families have none (a preference reward needs its weights: --rewards pickscore --reward-arg ...)
    default_rewards: tuple[str, ...] = ("shapes_strict", "shapes_partial")
    default_prompts = "shapes-bench"  # what `flowalign eval` evaluates when given no --prompts: the family's benchmark
    PRETRAIN_CONFIG = ""  # a family without a shipped checkpoint names the config that makes one
    LORA_TARGETS: tuple[str, ...] = SHAPES_LORA_TARGETS
    WEIGHT_PREFIX = "transformer.transformer_blocks."  # keys only this family's model.safetensors has (MMDiT blocks)
    NAMES = ("the shapes model", "the shapes grammar")  # the model and its grammar, as error lines name them

    def __init__(self, config: ShapesConfig, guidance_scale: Optional[float] = None):
        if not config.vocab:
            raise UserError("shapes model config has an empty vocabulary")
        if config.prediction not in ("v", "x"):
            raise UserError(f"shapes model prediction must be 'v' or 'x', got {config.prediction!r}")
        check_shift(config.shift, f"shapes model config shift={config.shift!r}",
                    "fix shift in the model's config.json (or model_config.shift when pretraining); 1.0 = no shift")
        self.config = config
        transformer, comps = self._build(config)
        self.text_encoder = ShapesTextEncoder(config.vocab, config.text_dim, config.text_layers, config.text_heads,
                                              config.max_len, config.pooled_dim, *self.NAMES)
        super().__init__(transformer, guidance_scale=config.guidance_scale if guidance_scale is None else guidance_scale,
                         latent_shape=self._latent_shape(config), dtype=torch.float32,
                         components={"text_encoder": self.text_encoder, **comps})
        names = [n for n, _ in transformer.named_modules()]
        self.lora_targets: tuple[str, ...] = tuple(  # only targets the network has (see _build)
            t for t in self.LORA_TARGETS if any(n == t or n.endswith("." + t) for n in names))
        self.lora_rank = int(config.lora_rank)
        self.lora_alpha = config.lora_alpha

    @property
    def default_steps(self) -> int:
        """Sampling steps when a command is given none (``--steps``): the config's ``sample_steps``."""
        return int(self.config.sample_steps)

    @staticmethod
    def _latent_shape(config: Any) -> tuple[int, ...]:
        return (config.channels, config.image_size, config.image_size)  # [C, H, W]

    def output_size(self) -> dict[str, int]:
        return {"height": self.config.image_size, "width": self.config.image_size}

    def _build(self, config: ShapesConfig) -> tuple[nn.Module, dict[str, nn.Module]]:
        """The denoiser and the extra trained components (the refiner)."""
        from diffusers import SD3Transformer2DModel

        transformer = SD3Transformer2DModel(**config.transformer_config())
        k, p = int(config.patch_embed_kernel), int(config.patch_size)
        pad = overlap_padding(k, p)
        if pad:
            # Overlapping patch embedding: each token also sees its neighbours' border pixels (a locality prior
            # that small ViT denoisers otherwise learn slowly). Same token grid: stride p, padding (k − p)/2.
            old = transformer.pos_embed.proj
            transformer.pos_embed.proj = nn.Conv2d(old.in_channels, old.out_channels, k, stride=p, padding=pad)
        comps: dict[str, nn.Module] = {}
        self.refiner: Optional[nn.Module] = None
        if config.refiner_channels:
            self.refiner = _Refiner(config.channels, config.refiner_channels)
            comps["refiner"] = self.refiner
        # the last MMDiT block is context_pre_only (no to_add_out): with num_layers=1 that target matches nothing and
        # add_lora would refuse the whole list, so __init__ keeps only the targets the network has
        return transformer, comps

    # ---- construction / IO -------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ShapesConfig | dict[str, Any], **kwargs: Any) -> "ShapesModel":
        """A freshly initialised model (random weights) from a config or its dict; vocab defaults to the grammar's."""
        if isinstance(config, dict):
            config = cls.CONFIG.from_dict(config)
        if not config.vocab:
            config = dataclasses.replace(config, vocab=list(cls._vocabulary()))
        return cls(config, **kwargs)

    @classmethod
    def _vocabulary(cls) -> list[str]:
        import importlib

        return importlib.import_module(cls.GRAMMAR).vocabulary()

    def _parse_prompt(self, prompt: str) -> Any:
        import importlib

        return importlib.import_module(self.GRAMMAR).parse(prompt)

    def prompt_note(self, prompt: str) -> Optional[str]:
        """Why ``prompt`` is outside the grammar this model was trained on, or None when it is inside. A prompt of
        known words in another order or number still encodes and samples (``flowalign sample`` warns), but the model
        never saw it and the verifier rewards refuse it."""
        try:
            self._parse_prompt(prompt)
        except UserError as e:
            return str(e)
        return None

    @classmethod
    def from_pretrained(cls, path: str = "", *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        guidance_scale: Optional[float] = None) -> "ShapesModel":
        """Load a checkpoint directory (``model.safetensors`` + ``config.json``); '' = the shipped model. Offline."""
        from safetensors.torch import load_file

        root = _asset_dir(cls.ASSET) if path in ("", None) else Path(path)
        cfg_file, w_file = root / "config.json", root / "model.safetensors"
        if path in ("", None) and not w_file.is_file() and cls.PRETRAIN_CONFIG:
            raise UserError(f"no {cls.ASSET} model ships with flowalign yet; pretrain one with `flowalign pretrain "
                            f"--config {cls.PRETRAIN_CONFIG} --out runs/{cls.ASSET}` and pass its final/ directory as "
                            f"the model path")
        if not cfg_file.is_file() or not w_file.is_file():
            raise UserError(f"no {cls.ASSET} model at {str(root)!r} (expected config.json and model.safetensors "
                            f"there); {_model_dir_hint(root, cls.ASSET)}")
        try:
            raw = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {str(cfg_file)!r} as JSON ({first_line(err)}); pass a directory written "
                            f"by `flowalign pretrain` (its final/)") from err
        if not isinstance(raw, dict):
            raise UserError(f"{str(cfg_file)!r} is not a {cls.ASSET} model config (a JSON object of its fields)")
        family = checkpoint_family(raw, w_file)
        if family is not None and family.ASSET != cls.ASSET:
            raise UserError(f"{str(root)!r} holds a {family.ASSET} model; pass --model {family.ASSET} "
                            f"(model.name: {family.ASSET} in a config)")
        config = cls.CONFIG.from_dict(raw)
        model = cls(config, guidance_scale=guidance_scale)
        model.load_state_dict(load_file(str(w_file)), source=str(w_file))
        for m in model.components.values():
            m.eval().requires_grad_(False)
            if dtype != torch.float32:
                m.to(dtype=dtype)
            m.to(device)
        model._dtype = dtype
        return model

    def state_dict(self) -> dict[str, Tensor]:
        """All weights, keyed ``<component>.<name>`` (the layout of ``model.safetensors``)."""
        return {f"{c}.{k}": v for c, m in self.components.items() for k, v in m.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor], source: str = "state dict") -> None:
        for c, m in self.components.items():
            part = {k[len(c) + 1:]: v for k, v in state.items() if k.startswith(c + ".")}
            missing, unexpected = m.load_state_dict(part, strict=False)
            if missing or unexpected:
                raise UserError(f"shapes weights from {source} do not match the config ({c}: missing "
                                f"{missing[:3]}, unexpected {unexpected[:3]})")

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``model.safetensors`` + ``config.json`` (atomically: temp files then rename)."""
        from safetensors.torch import save_file

        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        _atomic(root / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
        cfg = dataclasses.asdict(dataclasses.replace(self.config, guidance_scale=self.guidance_scale))
        _atomic(root / "config.json", lambda p: Path(p).write_text(json.dumps(cfg, indent=1)))

    # ---- FlowModel ---------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> Cond:
        """Per-prompt rows (dim 0 = len(prompts)): conditional and unconditional (empty prompt) embeddings.

        Raises UserError naming the word for text outside the shapes vocabulary.
        """
        prompts = list(prompts)
        ids, mask = self.text_encoder.tokenize(prompts + [""])
        h, pooled = self.text_encoder(ids.to(self.device), mask.to(self.device))  # [N+1, L, D], [N+1, P]
        n = len(prompts)
        return {
            "hidden": h[:n],  # [N, L, D]
            "pooled": pooled[:n],  # [N, P]
            "hidden_uncond": h[n:].expand(n, -1, -1),  # [N, L, D]
            "pooled_uncond": pooled[n:].expand(n, -1),  # [N, P]
        }

    def validate_prompts(self, prompts: Sequence[str]) -> None:
        """Raise UserError (one line, naming the word) for any prompt outside the vocabulary; no forward pass."""
        self.text_encoder.tokenize(list(prompts))

    def schedule(self, steps: int) -> Tensor:
        from flowalign.samplers.schedules import shifted_linear

        return shifted_linear(steps, self.config.shift)  # [T+1]

    def forward_transformer(self, x: Tensor, sigma: Tensor, hidden: Tensor, pooled: Tensor) -> Tensor:
        """One denoiser forward v_θ(x, σ | text) in fp32; σ → timestep 1000·σ as for SD3 (METHODS.md §1.5).

        With ``prediction="x"`` the network outputs the clean image x̂ and the velocity is
        v = (x_σ − x̂)/σ (Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise" (JiT),
        §3–4: x-prediction with a v-loss; their t = 1 − σ, clip 0.05). A small network cannot reproduce
        the high-dimensional noise that v = ε − x contains at low σ, but the image lies on a simple manifold.
        """
        sigma = self._sigma_batch(sigma, x.shape[0], x.device)  # [B]
        out = self._net(x, sigma, hidden, pooled)  # [B, C, H, W]
        if self.config.prediction == "x":
            s = sigma.clamp_min(self.config.x_min_sigma).view(-1, *([1] * (x.dim() - 1)))  # [B, 1, 1, 1]
            return (x.float() - out) / s  # [B, C, H, W]
        return out

    def _net(self, x: Tensor, sigma: Tensor, hidden: Tensor, pooled: Tensor) -> Tensor:
        out = self.transformer(hidden_states=x.to(self.dtype), encoder_hidden_states=hidden.to(self.dtype),
                               pooled_projections=pooled.to(self.dtype), timestep=1000.0 * sigma.float(),
                               return_dict=False)[0]  # fp32 timestep: in bf16 1000·σ rounds by up to ±2 (as SD3)
        if self.refiner is not None:
            out = out + self.refiner(out)  # [B, C, H, W]
        return out.float()  # [B, C, H, W]

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        w = self.guidance_scale
        if w == 1.0:
            return self.forward_transformer(x, sigma, cond["hidden"], cond["pooled"])
        sigma = self._sigma_batch(sigma, x.shape[0], x.device)  # [B]
        v = self.forward_transformer(
            torch.cat([x, x]), torch.cat([sigma, sigma]),
            torch.cat([cond["hidden_uncond"], cond["hidden"]]), torch.cat([cond["pooled_uncond"], cond["pooled"]]))
        v_u, v_c = v.chunk(2)  # [B, C, H, W] each
        return v_u + w * (v_c - v_u)

    def decode(self, x: Tensor) -> Tensor:
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)  # [B, 3, H, W] in [0, 1]

    def encode_images(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] → data x ∈ [-1, 1] (the inverse of ``decode``; used by pretraining)."""
        return images.to(self.device, self.dtype) * 2.0 - 1.0

    def num_parameters(self) -> dict[str, int]:
        return {c: sum(p.numel() for p in m.parameters()) for c, m in self.components.items()}


def _shapes_families() -> list[type]:
    """The built-in shapes model families (image, video)."""
    from flowalign.models.shapes_video import ShapesVideoModel

    return [ShapesModel, ShapesVideoModel]


def checkpoint_family(config: dict[str, Any], weights: Path) -> Optional[type]:
    """The shapes family (model class) whose checkpoint ``config.json`` (read as ``config``) and ``weights`` are: by
    the denoiser's keys in ``weights`` (read from the header only), else by ``config``'s keys when only one family has
    them all (the video config extends the image one); None when neither tells."""
    from safetensors import safe_open

    families = _shapes_families()
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            keys = list(f.keys())
    except Exception:  # unreadable: loading the weights says why  # noqa: BLE001
        keys = []
    by_weights = [m for m in families if any(k.startswith(m.WEIGHT_PREFIX) for k in keys)]
    if len(by_weights) == 1:
        return by_weights[0]
    by_config = [m for m in families if set(config) <= {f.name for f in dataclasses.fields(m.CONFIG)}]
    return by_config[0] if len(by_config) == 1 else None


def _model_dir_hint(root: Path, asset: str) -> str:
    """What to pass instead of ``root``, a directory without a model of the family ``asset``: the model of the run it
    is (``final/`` or a checkpoint holding one, with ``--model`` when it is the other family's), what else it holds
    (``base.path_hint``: a training run's LoRA, a diffusers pipeline's ``--model``), or the usual advice."""
    from flowalign.models.lora import latest_checkpoint

    files = ("config.json", "model.safetensors")
    if all((root / "final" / f).is_file() for f in files):
        model, why = root / "final", "a `flowalign pretrain` run writes its model there"
    else:
        model, why = latest_checkpoint(root, *files), "the newest model checkpoint in that run"
    if model is not None:
        try:
            family = checkpoint_family(json.loads((model / "config.json").read_text(encoding="utf-8")),
                                       model / "model.safetensors")
        except (OSError, ValueError, TypeError):
            family = None
        other = f"--model {family.ASSET} --path " if family is not None and family.ASSET != asset else ""
        return f"did you mean {other}{str(model)!r}? ({why})"
    other = path_hint(root, asset)  # a LoRA, a training run, a diffusers pipeline or one of its folders, a file
    if other is not None:
        return other
    if latest_checkpoint(root, "state.pt") is not None:
        return (f"{str(root)!r} is an unfinished `flowalign pretrain` run (its checkpoints hold training state, not "
                f"the model); finish it with `flowalign pretrain --out {root} --resume`, which writes {root / 'final'}")
    return "use '' for the shipped model or a directory written by `flowalign pretrain` (its final/)"


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; checkpoints are meant to be shared/packaged
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
