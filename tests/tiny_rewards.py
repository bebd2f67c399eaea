"""Tiny, random-weight reward towers built offline (DESIGN.md §7), saved to disk and loaded back through each reward's
real loading code.

Builders (each returns paths; a finished directory is marked ``.complete`` and not rebuilt):

* ``build_tiny_clip_dir(dir)``: a transformers ``CLIPModel`` (32 px, patch 8) + ``CLIPProcessor`` (byte-level BPE
  tokenizer from an in-memory vocabulary, so any prompt tokenizes) → PickScore, CLIPScore, aesthetic backbone.
* ``tiny_open_clip_arch()``: the open_clip model config of a tiny ViT (``fixtures/open_clip_tiny/model.json``, vocab of
  the byte-level tokenizer); ``build_tiny_hps_file(dir)`` saves an HPS-style checkpoint ``{"state_dict": …}`` with DDP
  ``module.`` prefixes, from weights that open_clip itself wrote (``fixtures/make_open_clip_tiny.py``).
* ``build_tiny_aesthetic_head(dir, embed_dim)``: a ``sac+logos+ava1-l14-linearMSE.pth``-layout head.
* ``build_tiny_imagereward_dir(dir)``: ``ImageReward.pt`` with BLIP's original key names + ``med_config.json`` + a BERT
  tokenizer directory.

Session fixtures (import them into a test module or conftest: ``from tiny_rewards import tiny_reward_kwargs``):
``tiny_clip_dir``, ``tiny_pickscore_dir`` (same directory), ``tiny_hps_files`` (``{"checkpoint", "arch", "tokenizer"}``),
``tiny_aesthetic_files`` (``{"path", "head"}``), ``tiny_imagereward_files`` (``{"path", "tokenizer_path",
"vision_heads"}``) and ``tiny_reward_kwargs``: name → kwargs, so that

    build_reward("pickscore", **tiny_reward_kwargs["pickscore"])   # likewise clipscore, hps, hpsv21, aesthetic, imagereward

builds the real class on the tiny weights (images of any size in [0, 1]; they are resized to 32 px).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import word_merges

OPEN_CLIP_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "open_clip_tiny"
WORDS = ("a photo of the red green blue cat dog circle square triangle on left right big small and "
         "painting two three star").split()


def _done(directory: Path) -> bool:
    return (directory / ".complete").exists()


def _mark(directory: Path) -> Path:
    (directory / ".complete").write_text("ok\n")
    return directory


def byte_level_clip_tokenizer(model_max_length: int = 77):
    """CLIP byte-level BPE tokenizer: all 256 byte symbols (with and without ``</w>``) + merges spelling WORDS."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab: dict[str, int] = {}
    for c in bytes_to_unicode().values():
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = word_merges(vocab, WORDS)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def build_tiny_clip_dir(directory, seed: int = 0, image_size: int = 32) -> Path:
    """transformers CLIPModel + CLIPProcessor (shortest side/crop = ``image_size``) saved to ``directory``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    directory = Path(directory)
    if _done(directory):
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    tok = byte_level_clip_tokenizer()
    bos, eos = tok.convert_tokens_to_ids("<|startoftext|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16,
    )
    model = CLIPModel(cfg).eval()
    ip = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(directory)
    model.save_pretrained(directory)
    return _mark(directory)


def tiny_open_clip_arch() -> str:
    """Path of the tiny open_clip model config (``arch=`` of the HPS rewards)."""
    return str(OPEN_CLIP_FIXTURE / "model.json")


def build_tiny_hps_file(directory, seed: int = 0, name: str = "HPS_v2_compressed.pt", ddp_prefix: bool = True) -> Path:
    """An HPS-style checkpoint ``{"state_dict": {"module.<key>": tensor}}`` of the tiny open_clip model.

    Seed 0 is the fixture that open_clip itself wrote (``fixtures/open_clip_tiny``); another seed adds seeded noise to
    every weight (different weights, the same open_clip key names and shapes), e.g. for an HPS v2.1 stand-in.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    if path.exists():
        return path
    state = torch.load(OPEN_CLIP_FIXTURE / "HPS_v2_compressed.pt", map_location="cpu", weights_only=True)["state_dict"]
    g = torch.Generator().manual_seed(seed)
    state = {k: v + 0.1 * torch.randn(v.shape, generator=g) if seed else v for k, v in state.items()}
    if not ddp_prefix:
        state = {k[len("module."):]: v for k, v in state.items()}
    torch.save({"state_dict": state}, path)
    return path


def build_tiny_aesthetic_head(directory, embed_dim: int = 16, seed: int = 0) -> Path:
    """``sac+logos+ava1-l14-linearMSE.pth`` layout: layers.{0,2,4,6,7}.{weight,bias}, dims D→1024→128→64→16→1."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "sac+logos+ava1-l14-linearMSE.pth"
    if path.exists():
        return path
    g = torch.Generator().manual_seed(seed)
    dims = [embed_dim, 1024, 128, 64, 16, 1]
    state = {}
    for i, idx in enumerate((0, 2, 4, 6, 7)):
        state[f"layers.{idx}.weight"] = torch.randn(dims[i + 1], dims[i], generator=g) / dims[i] ** 0.5
        state[f"layers.{idx}.bias"] = torch.randn(dims[i + 1], generator=g) * 0.1
    torch.save(state, path)
    return path


def bert_tokenizer():
    """A WordPiece BERT tokenizer (lower-case) from an in-memory vocabulary: specials, WORDS, letters, ##letters."""
    from transformers import BertTokenizer

    vocab: dict[str, int] = {}
    for t in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS)]:
        vocab.setdefault(t, len(vocab))
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault("##" + c, len(vocab))
    return BertTokenizer(vocab=vocab)


# BLIP's original ViT key names (vit.py), written out independently of flowalign's mapping.
def _blip_vit_state(width: int, depth: int, patch: int, image: int, mlp: int, g: torch.Generator) -> dict:
    n = (image // patch) ** 2 + 1
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    st = {"cls_token": r(1, 1, width), "pos_embed": r(1, n, width),
          "patch_embed.proj.weight": r(width, 3, patch, patch), "patch_embed.proj.bias": r(width),
          "norm.weight": 1 + r(width), "norm.bias": r(width)}
    for i in range(depth):
        b = f"blocks.{i}."
        st.update({b + "norm1.weight": 1 + r(width), b + "norm1.bias": r(width),
                   b + "attn.qkv.weight": r(3 * width, width), b + "attn.qkv.bias": r(3 * width),
                   b + "attn.proj.weight": r(width, width), b + "attn.proj.bias": r(width),
                   b + "norm2.weight": 1 + r(width), b + "norm2.bias": r(width),
                   b + "mlp.fc1.weight": r(mlp, width), b + "mlp.fc1.bias": r(mlp),
                   b + "mlp.fc2.weight": r(width, mlp), b + "mlp.fc2.bias": r(width)})
    return st


def build_tiny_imagereward_dir(directory, seed: int = 0) -> Path:
    """``ImageReward.pt`` (BLIP key names: blip.visual_encoder.*, blip.text_encoder.*, blip.vision_proj/text_proj,
    mlp.layers.*) + ``med_config.json`` + ``tokenizer/`` in ``directory``. Vision: width 32, 2 heads (pass
    ``vision_heads=2``), patch 8, 32 px; text: BERT with cross-attention, hidden 32, 2 layers."""
    from transformers import BlipTextConfig, BlipTextModel

    directory = Path(directory)
    if _done(directory):
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    tok = bert_tokenizer()
    tok.save_pretrained(directory / "tokenizer")
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 2,
           "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(tok) + 2,
           "encoder_width": 32, "add_cross_attention": True}
    (directory / "med_config.json").write_text(json.dumps(med, indent=2))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    text = BlipTextModel(BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=32, encoder_hidden_size=32,
                                        intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        max_position_embeddings=64, is_decoder=True), add_pooling_layer=False)
    state = {f"blip.visual_encoder.{k}": v for k, v in _blip_vit_state(32, 2, 8, 32, 64, g).items()}
    # med.py and transformers' BlipTextModel share key names; old checkpoints also carry position_ids
    state.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    state.update({"blip.vision_proj.weight": torch.randn(16, 32, generator=g), "blip.vision_proj.bias": torch.zeros(16),
                  "blip.text_proj.weight": torch.randn(16, 32, generator=g), "blip.text_proj.bias": torch.zeros(16)})
    head = torch.load(build_tiny_aesthetic_head(directory / "head", embed_dim=32, seed=seed), weights_only=True)
    state.update({f"mlp.{k}": v for k, v in head.items()})
    torch.save(state, directory / "ImageReward.pt")
    return _mark(directory)


# --------------------------------------------------------------------------------------------------------------------
# session fixtures


def _cache(tmp_path_factory, name: str) -> Path:
    return tmp_path_factory.getbasetemp() / "tiny_rewards" / name


def tiny_clip_dir_for(tmp_path_factory) -> Path:
    return build_tiny_clip_dir(_cache(tmp_path_factory, "clip"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return tiny_clip_dir_for(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_pickscore_dir(tiny_clip_dir) -> Path:
    return tiny_clip_dir


@pytest.fixture(scope="session")
def tiny_hps_files(tmp_path_factory) -> dict:
    d = _cache(tmp_path_factory, "hps")
    return {"checkpoint": build_tiny_hps_file(d), "arch": tiny_open_clip_arch(),
            "tokenizer": tiny_clip_dir_for(tmp_path_factory)}


@pytest.fixture(scope="session")
def tiny_aesthetic_files(tiny_clip_dir, tmp_path_factory) -> dict:
    return {"path": tiny_clip_dir, "head": build_tiny_aesthetic_head(_cache(tmp_path_factory, "aesthetic"), 16)}


@pytest.fixture(scope="session")
def tiny_imagereward_files(tmp_path_factory) -> dict:
    d = build_tiny_imagereward_dir(_cache(tmp_path_factory, "imagereward"))
    return {"path": d, "tokenizer_path": d / "tokenizer", "vision_heads": 2}


@pytest.fixture(scope="session")
def tiny_reward_kwargs(tiny_clip_dir, tiny_hps_files, tiny_aesthetic_files, tiny_imagereward_files, tmp_path_factory) -> dict:
    """name → kwargs for ``build_reward(name, **kwargs)`` on the tiny towers (all on CPU, fp32)."""
    d = _cache(tmp_path_factory, "hps")
    return {
        "pickscore": {"path": str(tiny_clip_dir)},
        "clipscore": {"path": str(tiny_clip_dir)},
        "aesthetic": {k: str(v) for k, v in tiny_aesthetic_files.items()},
        "hps": {k: str(v) for k, v in tiny_hps_files.items()},
        "hpsv21": {"checkpoint": str(build_tiny_hps_file(d, seed=1, name="HPS_v2.1_compressed.pt")),
                   "arch": tiny_hps_files["arch"], "tokenizer": str(tiny_hps_files["tokenizer"])},
        "imagereward": {k: (v if isinstance(v, int) else str(v)) for k, v in tiny_imagereward_files.items()},
    }
