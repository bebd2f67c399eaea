"""The built-in shapes model: shipped checkpoint, encoding, CFG, determinism, errors, save/load, LoRA."""

from __future__ import annotations

import json

import pytest
import torch

from flowalign.errors import UserError
from flowalign.models.shapes import SHAPES_LORA_TARGETS, ShapesConfig, ShapesModel
from flowalign.types import FlowModel

TINY = dict(vocab=["a", "an", "red", "blue", "orange", "circle", "square", "and"], image_size=16, patch_size=4,
            num_layers=2, num_heads=2, head_dim=8, text_dim=16, text_layers=1, text_heads=2, max_len=6, pooled_dim=16,
            guidance_scale=3.0, patch_embed_kernel=8, refiner_channels=4)


@pytest.fixture(scope="module")
def shipped() -> ShapesModel:
    return ShapesModel.from_pretrained("")


@pytest.fixture()
def tiny() -> ShapesModel:
    torch.manual_seed(0)
    m = ShapesModel.from_config(dict(TINY))
    for c in m.components.values():
        c.eval().requires_grad_(False)
    return m


def test_shipped_model_loads_offline_and_has_the_flowmodel_surface(shipped):
    assert isinstance(shipped, FlowModel)
    from importlib import resources

    asset = resources.files("flowalign") / "assets" / "shapes"
    assert (asset / "model.safetensors").is_file() and (asset / "config.json").is_file()
    size = (asset / "model.safetensors").stat().st_size + (asset / "config.json").stat().st_size
    assert size < 20 * 2**20
    cfg = json.loads((asset / "config.json").read_text())
    assert cfg["image_size"] == 32 and cfg["vocab"]
    n = sum(shipped.num_parameters().values())
    assert 1e6 < n < 10e6
    assert not any(p.requires_grad for c in shipped.components.values() for p in c.parameters())


def test_shipped_encode_velocity_decode_shapes(shipped):
    prompts = ["a red circle", "three blue triangles", "a green square to the left of an orange circle"]
    cond = shipped.encode(prompts)
    for k, v in cond.items():
        assert v.shape[0] == 3, k
    assert cond["hidden"].shape[1:] == (shipped.config.max_len, shipped.config.text_dim)
    # the unconditional rows are one shared embedding (the empty prompt), not the prompts'
    assert torch.equal(cond["hidden_uncond"][0], cond["hidden_uncond"][2])
    assert not torch.allclose(cond["hidden"][0], cond["hidden_uncond"][0])
    x = shipped.init_noise(3, torch.Generator().manual_seed(0))
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    with torch.no_grad():
        v = shipped.velocity(x, torch.full((3,), 0.5), cond)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    img = shipped.decode(torch.randn(2, 3, 32, 32) * 3)
    assert img.shape == (2, 3, 32, 32) and img.min() >= 0 and img.max() <= 1
    s = shipped.schedule(10)
    assert s.shape == (11,) and s[0] == 1 and s[-1] == 0 and (s[1:] < s[:-1]).all()


def _sample(model, prompts, seed, steps=4):
    from flowalign.samplers.loop import sample

    with torch.no_grad():
        x = model.init_noise(len(prompts), torch.Generator().manual_seed(seed))
        traj = sample(model.velocity, x, model.schedule(steps), model.encode(prompts), eta=0.0, kernel="euler")
        return model.decode(traj.final)


def test_sampling_is_deterministic_given_the_seed(shipped):
    a = _sample(shipped, ["a red circle", "a blue square"], seed=3)
    b = _sample(shipped, ["a red circle", "a blue square"], seed=3)
    c = _sample(shipped, ["a red circle", "a blue square"], seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_shipped_model_draws_the_prompted_single_object(shipped):
    """A property of the *trained* weights: a single-object prompt mostly yields that object."""
    from flowalign.shapes.verify import verify_batch

    prompts = ["a red circle", "a blue square", "a yellow triangle", "a green circle"] * 2
    img = _sample(shipped, prompts, seed=0, steps=shipped.config.sample_steps)
    strict = [r.strict for r in verify_batch(img, prompts)]
    assert sum(strict) >= 5, strict


def test_prompt_outside_the_grammar_names_the_word(tiny):
    with pytest.raises(UserError, match="'dog'"):
        tiny.encode(["a red dog"])
    with pytest.raises(UserError, match="at most 6"):
        tiny.encode(["a red circle and a blue square and"])
    tiny.encode(["A Red Circle."])  # case and a trailing period are fine
    tiny.encode([""])  # the empty prompt is the unconditional branch


def test_guidance_one_is_a_single_conditional_forward(tiny):
    cond = tiny.encode(["a red circle", "a blue square"])
    x = torch.randn(2, 3, 16, 16)
    sig = torch.tensor([0.3, 0.8])
    calls = []
    h = tiny.transformer.register_forward_hook(lambda m, a, kw, out: calls.append(kw["hidden_states"].shape[0]),
                                               with_kwargs=True)
    try:
        tiny.guidance_scale = 1.0
        v1 = tiny.velocity(x, sig, cond)
        assert calls == [2]
        direct = tiny.forward_transformer(x, sig, cond["hidden"], cond["pooled"])
        assert torch.equal(v1, direct)
        calls.clear()
        tiny.guidance_scale = 3.0
        v3 = tiny.velocity(x, sig, cond)
        assert calls == [4]  # batch doubling
    finally:
        h.remove()
    vu = tiny.forward_transformer(x, sig, cond["hidden_uncond"], cond["pooled_uncond"])
    torch.testing.assert_close(v3, vu + 3.0 * (direct - vu), rtol=1e-5, atol=1e-5)


def test_timestep_is_1000_sigma(tiny):
    seen = []
    h = tiny.transformer.register_forward_hook(lambda m, a, kw, out: seen.append(kw["timestep"].clone()),
                                               with_kwargs=True)
    try:
        tiny.guidance_scale = 1.0
        tiny.velocity(torch.randn(2, 3, 16, 16), torch.tensor([0.25, 1.0]), tiny.encode(["a red circle"] * 2))
    finally:
        h.remove()
    torch.testing.assert_close(seen[0], torch.tensor([250.0, 1000.0]))


def test_save_and_load_roundtrip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "m")
    back = ShapesModel.from_pretrained(str(tmp_path / "m"))
    assert back.config == ShapesConfig.from_dict(dict(TINY))
    assert back.guidance_scale == 3.0
    assert all(torch.equal(a, back.state_dict()[k]) for k, a in tiny.state_dict().items())
    assert ShapesModel.from_pretrained(str(tmp_path / "m"), guidance_scale=1.5).guidance_scale == 1.5


def test_unknown_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no shapes model"):
        ShapesModel.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="unknown shapes model config key"):
        ShapesConfig.from_dict({"patch": 2})
    with pytest.raises(UserError, match="patch_embed_kernel"):
        ShapesModel.from_config(dict(TINY, patch_embed_kernel=5))


def test_lora_wraps_the_mmdit_attention_and_is_a_noop_at_init(tiny, tmp_path):
    cond = tiny.encode(["a red circle"])
    x, sig = torch.randn(1, 3, 16, 16), torch.tensor([0.5])
    with torch.no_grad():
        before = tiny.velocity(x, sig, cond)
    params = tiny.add_lora()
    names = [n for n, _ in tiny.transformer.named_parameters() if "lora_A" in n]
    for t in SHAPES_LORA_TARGETS:
        assert any(f".{t}.lora_A" in n for n in names), t
    assert params and all(p.requires_grad for p in params)
    with torch.no_grad():
        assert torch.equal(tiny.velocity(x, sig, cond), before)
        # perturb LoRA B: the model changes, the reference context does not
        for n, p in tiny.transformer.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
        assert not torch.allclose(tiny.velocity(x, sig, cond), before)
        with tiny.reference():
            assert torch.equal(tiny.velocity(x, sig, cond), before)


def test_x_prediction_derives_the_velocity_from_the_clean_image_estimate():
    torch.manual_seed(0)
    m = ShapesModel.from_config(dict(TINY, prediction="x", x_min_sigma=0.05))
    m.guidance_scale = 1.0
    cond = m.encode(["a red circle", "a blue square"])
    x, sig = torch.randn(2, 3, 16, 16), torch.tensor([0.6, 0.01])
    with torch.no_grad():
        v = m.velocity(x, sig, cond)
        x_hat = m._net(x, sig, cond["hidden"], cond["pooled"])
    # x̂0 = x − σ·v recovers the network's clean-image output (σ clamped at 0.05 near the data end)
    torch.testing.assert_close(x[:1] - 0.6 * v[:1], x_hat[:1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x[1:] - 0.05 * v[1:], x_hat[1:], rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="prediction"):
        ShapesModel.from_config(dict(TINY, prediction="eps"))


# -------------------------------------------- timestep dtype, default LoRA targets, batch-independent SDE sampling


def test_shapes_bf16_model_gets_the_exact_fp32_timestep(tmp_path):
    """A bf16 shapes model passed ``(1000·σ).to(bf16)``: 999 became 1000 (bf16 spacing is 4 above 512), so the
    sinusoidal timestep embedding saw the wrong time. SD3 (and the fp32 shapes model) pass the exact fp32 1000·σ."""
    from flowalign.models.shapes import ShapesModel

    tiny = dict(vocab=["a", "red", "blue", "circle", "square"], image_size=8, patch_size=4, num_layers=1, num_heads=2,
                head_dim=8, text_dim=16, text_layers=1, text_heads=2, max_len=4, pooled_dim=16)
    torch.manual_seed(0)
    ShapesModel.from_config(tiny).save_pretrained(tmp_path)
    model = ShapesModel.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    seen = []
    model.transformer.time_text_embed.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    cond = model.encode(["a red circle"])
    x = model.init_noise(1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = model.velocity(x, torch.tensor(0.999), cond)
    assert v.dtype == torch.float32
    t = torch.cat(seen)
    assert t.dtype == torch.float32, t.dtype
    assert torch.equal(t, torch.full_like(t, 1000.0 * torch.tensor(0.999).item())), t


def test_shapes_one_layer_model_takes_the_default_lora():
    """With ``num_layers=1`` the only MMDiT block is context_pre_only and has no ``to_add_out``; the default target
    list named it anyway, so ``add_lora()`` raised "no module ... matches the LoRA target(s) ['to_add_out']"."""
    from flowalign.models.shapes import SHAPES_LORA_TARGETS, ShapesModel

    tiny = dict(vocab=["a", "red", "circle"], image_size=8, patch_size=4, num_layers=1, num_heads=2, head_dim=8,
                text_dim=16, text_layers=1, text_heads=2, max_len=4, pooled_dim=16)
    torch.manual_seed(0)
    model = ShapesModel.from_config(tiny)
    params = model.add_lora()
    assert params and set(model.lora_targets) == set(SHAPES_LORA_TARGETS) - {"to_add_out"}
    deeper = ShapesModel.from_config(dict(tiny, num_layers=2))
    assert deeper.lora_targets == SHAPES_LORA_TARGETS  # unchanged where every target exists


def test_sde_sample_of_a_prompt_and_seed_does_not_depend_on_its_batch():
    from flowalign.models.shapes import ShapesModel
    from flowalign.sample import generate

    torch.manual_seed(0)
    m = ShapesModel.from_config(dict(TINY))
    for c in m.components.values():
        c.eval().requires_grad_(False)
    kw = dict(steps=4, kernel="flow_sde", eta=0.7)
    alone = generate(m, ["a red circle"], [0], **kw)
    in_batch = generate(m, ["a blue square", "a red circle"], [5, 0], **kw)[1:]
    split = generate(m, ["a blue square", "a red circle"], [5, 0], batch_size=1, **kw)[1:]
    assert torch.allclose(alone, in_batch, atol=1e-4) and torch.allclose(alone, split, atol=1e-4)
    assert torch.equal(alone, generate(m, ["a red circle"], [0], **kw))  # still reproducible
    assert not torch.allclose(alone, generate(m, ["a red circle"], [1], **kw), atol=1e-3)


# -------------------------------------------- text encoder padding (mutation audit)


def test_text_encoder_ignores_padding_tokens():
    """Padding is masked out of the text encoder: the valid tokens' hidden states and the pooled vector (the masked
    mean of the hidden states, projected) do not depend on how many ``<pad>`` tokens follow the prompt."""
    from flowalign.models.shapes import ShapesTextEncoder

    torch.manual_seed(0)
    kw = dict(dim=16, layers=1, heads=2, pooled_dim=16)
    short = ShapesTextEncoder(TINY["vocab"], max_len=6, **kw).eval()
    long = ShapesTextEncoder(TINY["vocab"], max_len=10, **kw).eval()
    state = short.state_dict()
    long.load_state_dict({**state, "pos": torch.cat([state["pos"], torch.randn(4, 16)])})  # pos [10, D]
    prompts = ["a red circle", "an orange square and a", ""]
    with torch.no_grad():
        h_s, p_s = short(*short.tokenize(prompts))  # [3, 6, D], [3, P]
        h_l, p_l = long(*long.tokenize(prompts))  # [3, 10, D], [3, P]
        ids, mask = short.tokenize(prompts)  # [3, 6] each
        m = mask.float().unsqueeze(-1)  # [3, 6, 1]
        pooled = short.pool((h_s * m).sum(1) / m.sum(1))  # [3, P]
    for i in range(len(prompts)):
        n = int(mask[i].sum())
        torch.testing.assert_close(h_l[i, :n], h_s[i, :n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_l, p_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_s, pooled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("guidance, passes", [(4.0, 2), (1.0, 1)])
def test_bench_shapes_sample_counts_velocity_evaluations_like_the_trainer(guidance, passes):
    """`bench shapes-sample` printed `transformer_forwards_per_image: 24` at 12 steps, where train, steer and bench
    credit count a guided step (its conditional and unconditional pass) as one forward: it now prints both, named."""
    from flowalign.bench import bench_shapes_sample

    figures = bench_shapes_sample(["--n", "1", "--steps", "2", "--repeats", "0", "--guidance", str(guidance)])
    assert figures["velocity_evaluations_per_image"] == 2
    assert figures["transformer_passes_per_image"] == 2 * passes
    assert figures["image_shape"] == [1, 3, 32, 32]
