"""Review of flowalign/models/lora.py: load_lora must reproduce the saved adapter's function (or refuse), and
add_lora must refuse ranks / alphas that silently break the adapter."""

from __future__ import annotations

import math

import pytest
import torch

from flowalign.models import load_model
from flowalign.models import lora as L
from tiny_models import TINY_SIZES, tiny_flux_dir, tiny_wan_dir  # noqa: F401  (fixtures)

PROMPTS = ["a red cat", "two blue squares"]


from test_lora import Tiny  # noqa: E402  (the small attention-like module the LoRA tests share)


def _twin(m: Tiny) -> Tiny:
    """A fresh Tiny with the same base weights as ``m`` (which may already be wrapped)."""
    t = Tiny()
    t.load_state_dict({k.replace(".base_layer.", "."): v for k, v in m.state_dict().items() if ".lora_" not in k})
    return t


def _perturb(params, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_load_into_an_adapter_with_another_alpha_does_not_silently_rescale(tmp_path):
    """Resume / load into a model already wrapped with the same rank but another alpha: the old code copied the
    weights and kept the module's alpha, so the loaded LoRA ran at the wrong scale (0.41 off here) without a word."""
    x = torch.randn(4, 6)
    m = Tiny()
    _perturb(L.add_lora(m, ["to_q"], rank=2, alpha=8))
    want = m(x)
    L.save_lora(m, tmp_path)

    other = _twin(m)
    L.add_lora(other, ["to_q"], rank=2, alpha=2)  # same keys and shapes, scale 1 instead of 4
    before = {k: v.clone() for k, v in L.lora_state_dict(other).items()}
    try:
        L.load_lora(other, tmp_path)
    except ValueError as e:  # refusing is fine, but then nothing may have been overwritten
        assert "alpha" in str(e)
        assert all(torch.equal(v, before[k]) for k, v in L.lora_state_dict(other).items())
    else:
        assert torch.allclose(other(x), want, atol=1e-6), (other(x) - want).abs().max()


def test_load_of_a_config_add_lora_cannot_build_does_not_silently_rescale(tmp_path):
    """A file whose stored LoraConfig uses rsLoRA (scale alpha/sqrt(r); diffusers' load_lora_weights honours it):
    the old load_lora injected a plain alpha/r adapter from it and returned a different function."""
    from peft import LoraConfig, inject_adapter_in_model

    x = torch.randn(4, 6)
    m = Tiny()
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["to_q"],
                                       init_lora_weights="gaussian"), m)
    _perturb([p for n, p in m.named_parameters() if ".lora_" in n])
    want = m(x)
    L.save_lora(m, tmp_path)

    fresh = _twin(m)
    try:
        L.load_lora(fresh, tmp_path)
    except ValueError as e:
        assert "use_rslora" in str(e)
        assert not L.has_lora(fresh)  # refused before injecting anything
    else:
        assert torch.allclose(fresh(x), want, atol=1e-6), (fresh(x) - want).abs().max()


@pytest.mark.parametrize("rank, alpha", [(2.5, 4), (2, 0), (2, -4), (2, math.nan), (2, math.inf)])
def test_add_lora_rejects_bad_rank_and_alpha(rank, alpha):
    """rank 2.5 was truncated to 2; alpha 0 gave a LoRA with scale 0 (no-op, zero gradient: training silently does
    nothing); a negative alpha flipped the update's sign; NaN / inf made every output NaN even at init (0 * nan)."""
    m = Tiny()
    with pytest.raises(ValueError, match="rank|alpha"):
        L.add_lora(m, ["to_q"], rank=rank, alpha=alpha)
    assert not L.has_lora(m)


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_saved_lora_loads_into_flux_and_wan_pipelines(family, request, tmp_path):
    """Regression coverage (passes before and after): test_lora.py checks only SD3 against load_lora_weights."""
    d = request.getfixturevalue(f"tiny_{family}_dir")

    def load():
        return load_model(family, str(d), max_sequence_length=16, **TINY_SIZES[family])

    def v(model):
        with torch.no_grad():
            return model.velocity(x, torch.full((2,), 0.6), cond)

    model = load()
    cond, x = model.encode(PROMPTS), model.init_noise(2, torch.Generator().manual_seed(0))
    base = v(model)
    _perturb(model.add_lora(rank=4, alpha=2.5), scale=0.1)  # non-integer alpha, alpha != r
    ours = v(model)
    model.save_lora(tmp_path)
    piped = load()
    piped.pipe.load_lora_weights(str(tmp_path))
    assert (ours - base).abs().max() > 1e-2
    assert torch.allclose(v(piped), ours, atol=1e-5, rtol=0), (v(piped) - ours).abs().max()
    ours_loaded = load()
    ours_loaded.load_lora(tmp_path)
    assert torch.equal(v(ours_loaded), ours)
