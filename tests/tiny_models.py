"""Tiny, random-weight SD3 / FLUX.1 / Wan2.1 diffusers pipelines built fully offline (DESIGN.md §7).

Each ``build_tiny_*`` function builds the pipeline in memory (tokenizers from an in-code vocabulary,
text encoders and transformers from tiny configs), saves it with ``save_pretrained`` into a directory
and returns that path, so tests exercise the real ``from_pretrained(local_dir)`` loading path.
A finished directory is marked with ``.complete`` and is not rebuilt.

Session fixtures ``tiny_sd3_dir``, ``tiny_flux_dir``, ``tiny_wan_dir`` build each pipeline once per
test session under pytest's base temp dir. Import them into a conftest (or a test module) with
``from tiny_models import tiny_sd3_dir, tiny_flux_dir, tiny_wan_dir``.

Sizes (height × width [× frames]) the adapters should be loaded with: see ``TINY_SIZES``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

WORDS = (
    "a an the of on in and with photo picture painting of red green blue yellow black white big small "
    "cat dog bird car tree house circle square triangle star left right above below next to two three"
).split()

# Image / video sizes (pixels) that match the tiny transformers' sample sizes.
TINY_SIZES = {
    "sd3": dict(height=32, width=32),  # VAE ×2 → latent 16×16, SD3 patch 2
    "flux": dict(height=32, width=32),  # VAE ×2 → latent 16×16 → packed [64 tokens, 16]
    "wan": dict(height=32, width=32, num_frames=5),  # VAE ×8 spatial, ×4 temporal → [4, 2, 4, 4]
}


# --------------------------------------------------------------------------------------------------
# tokenizers from in-memory vocabularies (transformers 5 builds them from Python objects)


def word_merges(vocab: dict[str, int], words) -> list[tuple[str, str]]:
    """BPE merges that spell each word of ``words`` as one token, left to right; every partial spelling is added to
    ``vocab`` (in place) after its symbols, so the ids follow the words' order."""
    merges: list[tuple[str, str]] = []
    for w in dict.fromkeys(words):
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        cur = parts[0]
        for p in parts[1:]:
            if (cur, p) not in merges:
                merges.append((cur, p))
            cur = cur + p
            vocab.setdefault(cur, len(vocab))
    return merges


def clip_tokenizer(model_max_length: int = 16):
    """A byte-level-BPE CLIP tokenizer whose merges spell every word of WORDS as one token."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in sorted(set("".join(WORDS))):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = word_merges(vocab, WORDS)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def t5_tokenizer(model_max_length: int = 32):
    """A unigram T5 tokenizer (also used for Wan's UMT5) with one piece per word of WORDS plus characters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -1.0 - 0.01 * i) for i, w in enumerate(dict.fromkeys(WORDS))]
    pieces += [("▁", -5.0)] + [(c, -10.0) for c in sorted(set("".join(WORDS)))]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _clip_text_encoder(vocab_size: int, hidden: int = 32, projection: int = 32, max_len: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=max_len, projection_dim=projection,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return CLIPTextModelWithProjection(cfg).eval()


def _t5_config_kwargs(vocab_size: int, d_model: int) -> dict:
    return dict(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )


def _image_vae(latent_channels: int, shift: float, scale: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
        shift_factor=shift, scaling_factor=scale, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()


def _done(directory: Path) -> bool:
    return (directory / ".complete").exists()


def _save(pipe, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(directory))
    (directory / ".complete").write_text("ok\n")
    return directory


# --------------------------------------------------------------------------------------------------
# pipelines


def tiny_sd3_pipeline(seed: int = 0):
    """StableDiffusion3Pipeline: two CLIP-with-projection (32 wide) + T5 (64 wide), 2-layer MMDiT, 4-channel VAE ×2."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok, tok_t5 = clip_tokenizer(), t5_tokenizer()
    te1 = _clip_text_encoder(len(tok))
    te2 = _clip_text_encoder(len(tok))
    te3 = T5EncoderModel(T5Config(**_t5_config_kwargs(len(tok_t5), 64))).eval()
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64,
        pos_embed_max_size=32,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_image_vae(4, shift=0.0609, scale=1.5305),
        text_encoder=te1, tokenizer=tok, text_encoder_2=te2, tokenizer_2=clip_tokenizer(),
        text_encoder_3=te3, tokenizer_3=tok_t5,
    )


def tiny_flux_pipeline(seed: int = 0):
    """FluxPipeline: CLIP (32 wide, pooled) + T5 (32 wide), 1 double + 1 single block, guidance-distilled, VAE ×2."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok, tok_t5 = clip_tokenizer(), t5_tokenizer()
    te1 = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()
    te2 = T5EncoderModel(T5Config(**_t5_config_kwargs(len(tok_t5), 32))).eval()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
        base_shift=0.5, max_shift=1.15,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=_image_vae(4, shift=0.1159, scale=0.3611), text_encoder=te1, tokenizer=tok,
        text_encoder_2=te2, tokenizer_2=tok_t5, transformer=transformer,
    )


def tiny_wan_pipeline(seed: int = 0):
    """WanPipeline: UMT5 (32 wide), 2-block Wan DiT, 4-channel causal video VAE (×8 spatial, ×4 temporal), UniPC."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tok = t5_tokenizer()
    te = UMT5EncoderModel(UMT5Config(**_t5_config_kwargs(len(tok), 32))).eval()
    z = 4
    vae = AutoencoderKLWan(
        base_dim=4, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, -0.4], latents_std=[1.5, 0.8, 2.0, 1.2],
    ).eval()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=z, out_channels=z,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    ).eval()
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0,
    )
    return WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=scheduler, transformer=transformer)


def build_tiny_sd3(directory) -> Path:
    directory = Path(directory)
    return directory if _done(directory) else _save(tiny_sd3_pipeline(), directory)


def build_tiny_flux(directory) -> Path:
    directory = Path(directory)
    return directory if _done(directory) else _save(tiny_flux_pipeline(), directory)


def build_tiny_wan(directory) -> Path:
    directory = Path(directory)
    return directory if _done(directory) else _save(tiny_wan_pipeline(), directory)


# --------------------------------------------------------------------------------------------------
# session fixtures (one build per session; the ``.complete`` marker also dedupes repeated imports)


def _cache(tmp_path_factory, name: str) -> Path:
    return tmp_path_factory.getbasetemp() / "tiny_models" / name


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory) -> Path:
    return build_tiny_sd3(_cache(tmp_path_factory, "sd3"))


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> Path:
    return build_tiny_flux(_cache(tmp_path_factory, "flux"))


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory) -> Path:
    return build_tiny_wan(_cache(tmp_path_factory, "wan"))
