"""LoRA utilities: no-op at init, exact reference policy, only LoRA trains, diffusers-compatible save/load."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from flowalign.models import load_model
from flowalign.models import lora as L
from tiny_models import TINY_SIZES, tiny_flux_dir, tiny_sd3_dir, tiny_wan_dir  # noqa: F401  (fixtures)

PROMPTS = ["a red cat", "two blue squares"]


def _sd3(directory):
    return load_model("sd3", str(directory), max_sequence_length=16, **TINY_SIZES["sd3"])


def _v(model, cond, x, sigma=0.6):
    with torch.no_grad():
        return model.velocity(x, torch.full((x.shape[0],), sigma), cond)


def _perturb(params, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture()
def sd3(tiny_sd3_dir):  # noqa: F811
    model = _sd3(tiny_sd3_dir)
    return model, model.encode(PROMPTS), model.init_noise(2, torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------------------------------
# generic module


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"to_q": nn.Linear(6, 6), "to_k": nn.Linear(6, 6)})
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.attn["to_q"](x) * self.attn["to_k"](x)))


def test_generic_module_targets_freezing_and_disable():
    m = Tiny()
    x = torch.randn(4, 6)
    base = m(x)
    params = L.add_lora(m, ["to_q", "to_k"], rank=2, alpha=4)
    assert len(params) == 4 and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        n for n, _ in m.named_parameters() if ".lora_" in n}
    assert torch.equal(m(x), base)  # B = 0 ⇒ exact no-op
    _perturb(params)
    assert not torch.allclose(m(x), base)
    with L.lora_disabled(m):
        assert torch.equal(m(x), base)
    assert all(p.requires_grad for p in params)  # restored after the context
    with pytest.raises(ValueError, match="no module"):
        L.add_lora(Tiny(), ["does_not_exist"], rank=2, alpha=4)
    with pytest.raises(ValueError, match="already"):
        L.add_lora(m, ["to_q"], rank=2, alpha=4)


def test_lora_keeps_fp32_master_weights_on_a_bf16_module():
    m = Tiny().to(torch.bfloat16)
    params = L.add_lora(m, ["to_q"], rank=2, alpha=4)
    assert all(p.dtype == torch.float32 for p in params)
    _perturb(params)
    assert m(torch.randn(2, 6, dtype=torch.bfloat16)).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------
# through the SD3 adapter


def test_noop_at_init_and_family_defaults(sd3):
    model, cond, x = sd3
    base = _v(model, cond, x)
    params = model.add_lora()
    cfg = model.transformer.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.init_lora_weights) == (32, 64, "gaussian")
    assert set(cfg.target_modules) == set(model.lora_targets)
    names = [n for n, p in model.transformer.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n for n in names) and len(names) == len(params)
    lora = {n: p.detach() for n, p in model.transformer.named_parameters() if ".lora_" in n}
    assert all(float(p.abs().max()) == 0 for n, p in lora.items() if ".lora_B." in n)
    assert all(float(p.abs().max()) > 0 for n, p in lora.items() if ".lora_A." in n)
    assert torch.equal(_v(model, cond, x), base)


def test_reference_reproduces_the_base_exactly(sd3):
    model, cond, x = sd3
    base = _v(model, cond, x)
    model.add_lora(rank=4, alpha=8)
    _perturb(model.lora_parameters())
    tuned = _v(model, cond, x)
    assert (tuned - base).abs().max() > 1e-3
    with model.reference():
        assert torch.equal(_v(model, cond, x), base)
    assert torch.equal(_v(model, cond, x), tuned)
    assert all(p.requires_grad for p in model.lora_parameters())


def test_two_adamw_steps_change_only_lora(sd3):
    """Step 1 moves only lora_B (A's gradient is Bᵀ·… = 0); step 2 moves lora_A too; base weights never move."""
    model, cond, x = sd3
    before = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    params = model.add_lora(rank=4, alpha=8)
    # weight_decay=0: decoupled decay would shrink lora_A on step 1 even though its gradient is zero.
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)

    def snapshot():
        return {k: v.clone() for k, v in model.transformer.state_dict().items()}

    def step():
        opt.zero_grad()
        (model.velocity(x, torch.full((2,), 0.6), cond) ** 2).mean().backward()
        opt.step()
        return snapshot()

    last = model.transformer.config.num_layers - 1
    after0 = snapshot()
    after1 = step()
    after2 = step()
    base_keys = [k for k in after0 if ".lora_" not in k]
    a_keys = [k for k in after0 if ".lora_A." in k]
    b_keys = [k for k in after0 if ".lora_B." in k]
    assert len(base_keys) == len(before) and a_keys and len(a_keys) == len(b_keys)
    for k in base_keys:  # peft renames a wrapped weight to <path>.base_layer.weight
        assert torch.equal(after2[k], before[k.replace(".base_layer.", ".")]), k
    # The last MMDiT block is context_pre_only: its add_q_proj only feeds the discarded text stream (zero gradient).
    dead = {k for k in b_keys + a_keys if k.startswith(f"transformer_blocks.{last}.attn.add_q_proj.")}
    assert len(dead) == 2
    assert all(torch.equal(after1[k], after0[k]) for k in a_keys)
    assert all(not torch.equal(after1[k], after0[k]) for k in b_keys if k not in dead)
    assert all(not torch.equal(after2[k], after1[k]) for k in a_keys if k not in dead)


def test_save_load_round_trip_is_bitwise(sd3, tiny_sd3_dir, tmp_path):  # noqa: F811
    model, cond, x = sd3
    model.add_lora(rank=4, alpha=8)
    _perturb(model.lora_parameters())
    path = model.save_lora(tmp_path / "ckpt")
    assert path.name == "pytorch_lora_weights.safetensors"
    want = model.lora_state_dict()
    tuned = _v(model, cond, x)

    fresh = _sd3(tiny_sd3_dir)  # no adapter yet: injected from the stored LoraConfig
    fresh.load_lora(tmp_path / "ckpt")
    got = fresh.lora_state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(_v(fresh, cond, x), tuned)

    wrapped = _sd3(tiny_sd3_dir)  # already wrapped with the same shape
    wrapped.add_lora(rank=4, alpha=8)
    wrapped.load_lora(tmp_path / "ckpt")
    assert torch.equal(_v(wrapped, cond, x), tuned)

    wrong = _sd3(tiny_sd3_dir)
    wrong.add_lora(rank=4, alpha=8, targets=("attn.to_q",))
    with pytest.raises(ValueError, match="keys do not match"):
        wrong.load_lora(tmp_path / "ckpt")


def test_file_format_is_diffusers_convention(sd3, tmp_path):
    from safetensors import safe_open

    model, _, _ = sd3
    model.add_lora()
    path = model.save_lora(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.") and (".lora_A.weight" in k or ".lora_B.weight" in k)
                        for k in keys)
    assert not any(".default." in k for k in keys)  # adapter name stripped (peft convention)
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["transformer.r"] == 32 and config["transformer.lora_alpha"] == 64


def test_saved_lora_loads_into_a_diffusers_pipeline(sd3, tiny_sd3_dir, tmp_path):  # noqa: F811
    """``StableDiffusion3Pipeline.load_lora_weights(dir)`` reads our file, with rank and alpha, and reproduces us."""
    from diffusers import StableDiffusion3Pipeline

    from flowalign.samplers import sample

    model, cond, x = sd3
    model.add_lora(rank=4, alpha=16)  # α ≠ r: a wrong scale would show
    _perturb(model.lora_parameters(), scale=0.1)
    model.save_lora(tmp_path)

    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_dir))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, guidance_scale=model.guidance_scale, max_sequence_length=16,
              output_type="latent", **TINY_SIZES["sd3"])
    with torch.no_grad():
        base = pipe(PROMPTS, latents=x.clone(), **kw).images
        pipe.load_lora_weights(str(tmp_path))
        loaded = pipe(PROMPTS, latents=x.clone(), **kw).images
        ours = sample(model.velocity, x, pipe.scheduler.sigmas.float(), cond, kernel="euler").final
    assert (loaded - base).abs().max() > 1e-2
    assert torch.allclose(loaded, ours, atol=1e-5, rtol=0), (loaded - ours).abs().max()


# ------------------------ load_lora reproduces the saved adapter or refuses; add_lora refuses bad ranks and alphas


def _twin(m: Tiny) -> Tiny:
    """A fresh Tiny with the same base weights as ``m`` (which may already be wrapped)."""
    t = Tiny()
    t.load_state_dict({k.replace(".base_layer.", "."): v for k, v in m.state_dict().items() if ".lora_" not in k})
    return t


def _perturb_strong(params, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_load_into_an_adapter_with_another_alpha_does_not_silently_rescale(tmp_path):
    """Resume / load into a model already wrapped with the same rank but another alpha: the old code copied the
    weights and kept the module's alpha, so the loaded LoRA ran at the wrong scale (0.41 off here) without a word."""
    x = torch.randn(4, 6)
    m = Tiny()
    _perturb_strong(L.add_lora(m, ["to_q"], rank=2, alpha=8))
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
    _perturb_strong([p for n, p in m.named_parameters() if ".lora_" in n])
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
    """test_saved_lora_loads_into_a_diffusers_pipeline checks only SD3 against load_lora_weights; this, FLUX and Wan."""
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


# ---------------------------------------------- a LoRA saved by diffusers itself (no flowalign config in the file)


def _diffusers_lora(tiny_sd3_dir, directory, *, alpha, metadata):  # noqa: F811
    """A LoRA written by ``StableDiffusion3Pipeline.save_lora_weights`` (as diffusers' train_dreambooth_lora_sd3.py
    does) on the tiny SD3, r = 4 on to_q/k/v/out.0 with B ≠ 0; the LoraConfig goes into the file only with
    ``metadata``."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_dir))
    config = LoraConfig(r=4, lora_alpha=alpha, init_lora_weights="gaussian",
                        target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    pipe.transformer.add_adapter(config)
    _perturb([p for n, p in pipe.transformer.named_parameters() if "lora_B" in n], scale=0.1)
    kw = {"transformer_lora_adapter_metadata": config.to_dict()} if metadata else {}
    StableDiffusion3Pipeline.save_lora_weights(str(directory), get_peft_model_state_dict(pipe.transformer), **kw)
    return directory


@pytest.mark.parametrize("metadata", [False, True])
def test_a_lora_saved_by_diffusers_loads_as_diffusers_loads_it(sd3, tiny_sd3_dir, tmp_path, metadata):  # noqa: F811
    """`sample --lora <diffusers-saved dir>` failed with "no LoRA config metadata; add_lora(...) with the right targets
    first" (a Python API, to a command-line user). flowalign now builds the adapter as diffusers' load_lora_weights does:
    targets and rank from the tensors, alpha from the file's metadata, else alpha = r."""
    model, cond, x = sd3
    lora = _diffusers_lora(tiny_sd3_dir, tmp_path / "lora", alpha=8, metadata=metadata)  # α = 2r: a scale that shows
    base = _v(model, cond, x)
    ref = _sd3(tiny_sd3_dir)
    ref.pipe.load_lora_weights(str(lora))
    want = _v(ref, cond, x)
    model.load_lora(lora)
    got = _v(model, cond, x)
    assert (want - base).abs().max() > 1e-2
    assert torch.allclose(got, want, atol=1e-6, rtol=0), (got - want).abs().max()
    cfg = model.transformer.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha) == (4, 8 if metadata else 4)


def test_sample_takes_a_lora_saved_by_diffusers(tiny_sd3_dir, tmp_path):  # noqa: F811
    from flowalign.cli import main

    lora = _diffusers_lora(tiny_sd3_dir, tmp_path / "lora", alpha=4, metadata=False)
    out = tmp_path / "g.png"
    assert main(["sample", "a red cat", "--model", "sd3", "--path", str(tiny_sd3_dir), "--model-arg", "height=32",
                 "--model-arg", "width=32", "--model-arg", "max_sequence_length=16", "--steps", "1", "--seeds", "1",
                 "--lora", str(lora), "--out", str(out)]) == 0
    assert out.is_file()


def test_infer_config_reads_peft_keys_and_refuses_other_layouts():
    sd = {"a.to_q.lora_A.weight": torch.zeros(4, 6), "a.to_q.lora_B.weight": torch.zeros(6, 4),
          "b.to_k.lora_A.weight": torch.zeros(4, 6), "b.to_k.lora_B.weight": torch.zeros(6, 4)}
    assert L.infer_config(sd) == {"r": 4, "lora_alpha": 4, "target_modules": ["a.to_q", "b.to_k"]}
    with pytest.raises(ValueError, match="different ranks"):
        L.infer_config({**sd, "c.lora_A.weight": torch.zeros(2, 6)})
    for bad in ({"a.to_q.lora.down.weight": torch.zeros(4, 6)}, {"a.to_q.alpha": torch.tensor(4.0)},
                {"a.to_q.lora_magnitude_vector": torch.zeros(6)}):
        with pytest.raises(ValueError, match="lora_A.weight"):
            L.infer_config({**sd, **bad})


def test_a_lora_with_text_encoder_layers_is_refused_not_half_applied(tmp_path):
    """diffusers' save_lora_weights can add text-encoder LoRA layers, which flowalign does not apply: loading only the
    transformer's part would sample another model than diffusers' load_lora_weights, without a word."""
    from safetensors.torch import save_file

    save_file({"transformer.a.to_q.lora_A.weight": torch.zeros(2, 6), "transformer.a.to_q.lora_B.weight": torch.zeros(6, 2),
               "text_encoder.q_proj.lora_A.weight": torch.zeros(2, 6)}, str(tmp_path / L.WEIGHT_NAME))
    with pytest.raises(ValueError, match=r"also holds LoRA weights of text_encoder, which flowalign does not apply"):
        L.read_lora(tmp_path)
    save_file({"text_encoder.q_proj.lora_A.weight": torch.zeros(2, 6)}, str(tmp_path / L.WEIGHT_NAME))
    with pytest.raises(ValueError, match=r"holds no transformer LoRA, only LoRA weights of text_encoder"):
        L.read_lora(tmp_path)


def test_a_kohya_lora_is_named_as_another_layout(tmp_path):
    """kohya's keys (lora_unet_<module>.lora_down.weight, .alpha) were listed module by module as 'also holds LoRA
    weights of [...]', cut mid-name by the one-line limit, never saying what flowalign reads."""
    from safetensors.torch import save_file

    keys = {f"lora_unet_double_blocks_{i}_img_attn_proj.{k}": torch.zeros(2, 2) for i in range(20)
            for k in ("lora_down.weight", "lora_up.weight")}
    save_file(keys, str(tmp_path / L.WEIGHT_NAME))
    with pytest.raises(ValueError, match=r"a LoRA in another layout \(kohya's .*transformer.<module>.lora_A.weight"):
        L.read_lora(tmp_path)


def test_a_stored_config_that_selects_modules_by_regex_loads_the_modules_the_file_holds(sd3, tiny_sd3_dir, tmp_path):  # noqa: F811
    """diffusers' training scripts may store target_modules as a regex string (or exclude_modules / layers_to_transform):
    add_lora iterated the string character by character. The adapter now covers exactly the modules the tensors name."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model, cond, x = sd3
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_dir))
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=r".*attn\.to_(q|v)")
    pipe.transformer.add_adapter(config)
    _perturb([p for n, p in pipe.transformer.named_parameters() if "lora_B" in n], scale=0.1)
    StableDiffusion3Pipeline.save_lora_weights(str(tmp_path), get_peft_model_state_dict(pipe.transformer),
                                               transformer_lora_adapter_metadata=config.to_dict())
    ref = _sd3(tiny_sd3_dir)
    ref.pipe.load_lora_weights(str(tmp_path))
    model.load_lora(tmp_path)
    assert torch.allclose(_v(model, cond, x), _v(ref, cond, x), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# scale alpha / r and the reference context's bookkeeping (mutation audit)


def test_lora_adds_alpha_over_r_times_b_a_with_a_fractional_alpha():
    """peft LoRA: W x + (α/r)·B A x (Hu et al. 2021, eq. 3's scaling). A fractional α is kept (α = 1.5, r = 2 gives
    0.75), not truncated to an integer (which would give 0.5)."""
    m = Tiny()
    x = torch.randn(4, 6)  # [N, 6]
    base = m.attn["to_q"](x)  # [N, 6]
    L.add_lora(m, ["to_q"], rank=2, alpha=1.5)
    assert m.peft_config["default"].lora_alpha == 1.5
    _perturb(L.lora_parameters(m), scale=0.3)
    a = m.attn["to_q"].lora_A["default"].weight  # [r, 6]
    b = m.attn["to_q"].lora_B["default"].weight  # [6, r]
    with torch.no_grad():
        delta = m.attn["to_q"](x) - base  # [N, 6]
        want = 0.75 * x @ a.T @ b.T  # [N, 6]
    assert want.abs().max() > 1e-2
    assert torch.allclose(delta, want, atol=1e-6, rtol=0), (delta - want).abs().max()


def test_reference_context_nests_and_restores_the_state_it_found():
    """``lora_disabled`` restores what it found, not "on": a nested reference context leaves the outer one disabled,
    and LoRA tensors frozen before it (evaluation) stay frozen after it (peft's ``enable_adapters(True)`` would set
    ``requires_grad`` on them)."""
    m = Tiny()
    x = torch.randn(4, 6)  # [N, 6]
    base = m(x)  # [N, 3]
    params = L.add_lora(m, ["to_q", "to_k"], rank=2, alpha=4)
    _perturb(params)
    tuned = m(x)  # [N, 3]
    assert not torch.allclose(tuned, base)
    with L.lora_disabled(m):
        with L.lora_disabled(m):
            assert torch.equal(m(x), base)
        assert torch.equal(m(x), base)  # still the reference after the inner context
    assert torch.equal(m(x), tuned)
    params[0].requires_grad_(False)
    with L.lora_disabled(m):
        pass
    assert [p.requires_grad for p in params] == [False] + [True] * (len(params) - 1)
