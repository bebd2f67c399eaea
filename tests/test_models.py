"""SD3 / FLUX.1 / Wan2.1 adapters on tiny random pipelines saved to disk and reloaded (offline, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowalign.errors import UserError
from flowalign.models import load_model
from flowalign.samplers import KERNELS, eta_schedule, gather_cond, live_eta, sample, step_log_prob
from flowalign.types import FlowModel
from tiny_models import TINY_SIZES, tiny_flux_dir, tiny_sd3_dir, tiny_wan_dir  # noqa: F401  (fixtures)

FAMILIES = ("sd3", "flux", "wan")
PROMPTS = ["a red cat on the left of a blue dog", "two small yellow stars"]
SEQ = 16  # T5 / UMT5 max_sequence_length for the tiny models


def _load(family: str, directory, **kw):
    return load_model(family, str(directory), max_sequence_length=SEQ, **TINY_SIZES[family], **kw)


@pytest.fixture(scope="module")
def adapters(tiny_sd3_dir, tiny_flux_dir, tiny_wan_dir):  # noqa: F811
    dirs = {"sd3": tiny_sd3_dir, "flux": tiny_flux_dir, "wan": tiny_wan_dir}
    return {f: _load(f, dirs[f]) for f in FAMILIES}, dirs


@pytest.fixture(scope="module")
def conds(adapters):
    models, _ = adapters
    return {f: models[f].encode(PROMPTS) for f in FAMILIES}


def _pipeline(family: str, directory):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline, WanPipeline

    cls = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline, "wan": WanPipeline}[family]
    pipe = cls.from_pretrained(str(directory))
    if family == "wan":  # the real Wan scheduler is UniPC; an Euler scheduler makes the step comparable
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------------
# shapes and loading


@pytest.mark.parametrize("family", FAMILIES)
def test_protocol_and_shapes(adapters, conds, family):
    model = adapters[0][family]
    assert isinstance(model, FlowModel)
    cond = conds[family]
    assert all(v.shape[0] == len(PROMPTS) for v in cond.values()), {k: v.shape for k, v in cond.items()}
    x = model.init_noise(3, torch.Generator().manual_seed(0))
    assert x.shape == (3, *model.latent_shape) and x.dtype == torch.float32
    cond_b = gather_cond(cond, torch.tensor([0, 1, 1]))
    with torch.no_grad():
        v = model.velocity(x, torch.full((3,), 0.7), cond_b)
        img = model.decode(x)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    h, w = TINY_SIZES[family]["height"], TINY_SIZES[family]["width"]
    expected = (3, TINY_SIZES["wan"]["num_frames"], 3, h, w) if family == "wan" else (3, 3, h, w)
    assert img.shape == expected and img.min() >= 0 and img.max() <= 1
    s = model.schedule(5)
    assert s.shape == (6,) and s[0] == 1 and s[-1] == 0 and (s[1:] < s[:-1]).all()


def test_latent_shapes_follow_the_vae(adapters):
    models, _ = adapters
    assert models["sd3"].latent_shape == (4, 16, 16)  # VAE ×2
    assert models["flux"].latent_shape == (64, 16)  # packed: (16/2)² tokens × 4·4 channels
    assert models["wan"].latent_shape == (4, 2, 4, 4)  # (5 − 1)/4 + 1 latent frames, ×8 spatial


def test_bad_inputs_raise_user_errors(tiny_sd3_dir, tiny_wan_dir, tmp_path):  # noqa: F811
    with pytest.raises(UserError, match="multiples"):
        load_model("sd3", str(tiny_sd3_dir), height=30, width=32)
    with pytest.raises(UserError, match="num_frames"):
        load_model("wan", str(tiny_wan_dir), height=32, width=32, num_frames=6)
    with pytest.raises(UserError, match="cannot load"):
        load_model("sd3", str(tmp_path / "missing"))


# --------------------------------------------------------------------------------------------------
# the adapter is the diffusers pipeline's denoiser


@pytest.mark.parametrize("family", FAMILIES)
def test_euler_sampling_matches_the_diffusers_pipeline(adapters, conds, family):
    """Adapter velocity + our Euler kernel on the scheduler's grid == the pipeline's own CFG loop, then decode."""
    models, dirs = adapters
    model, pipe = models[family], _pipeline(family, dirs[family])
    x0 = model.init_noise(2, torch.Generator().manual_seed(3))
    size = dict(TINY_SIZES[family])
    common = dict(num_inference_steps=3, guidance_scale=model.guidance_scale, max_sequence_length=SEQ, **size)
    with torch.no_grad():
        ref = pipe(PROMPTS, latents=x0.clone(), output_type="latent", **common)
        ref_latents = ref.frames if family == "wan" else ref.images
        ref_px = pipe(PROMPTS, latents=x0.clone(), output_type="pt", **common)
        ref_px = ref_px.frames if family == "wan" else ref_px.images
        traj = sample(model.velocity, x0, pipe.scheduler.sigmas.float(), conds[family], eta=0.0, kernel="euler")
        px = model.decode(traj.final)
    assert torch.allclose(traj.final, ref_latents, atol=2e-5, rtol=0), (traj.final - ref_latents).abs().max()
    assert (traj.final - x0).abs().max() > 0.1  # the comparison is not vacuous
    assert torch.allclose(px, ref_px.float(), atol=1e-4), (px - ref_px).abs().max()


def test_sd3_schedule_equals_diffusers_scheduler(adapters):
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = adapters[0]["sd3"]
    for steps in (10, 40):
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
        sched.set_timesteps(steps)
        assert torch.allclose(model.schedule(steps), sched.sigmas.float(), atol=1e-7, rtol=0)
    assert abs(float(model.schedule(10)[9]) - 0.008929) < 1e-6  # the double-shift quirk (METHODS.md §1.2)


def test_flux_schedule_equals_what_fluxpipeline_sets(adapters):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    model = adapters[0]["flux"]
    cfg = model.pipe.scheduler.config
    for steps in (6, 28):
        sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
        mu = calculate_shift(model.latent_shape[0], cfg["base_image_seq_len"], cfg["max_image_seq_len"],
                             cfg["base_shift"], cfg["max_shift"])
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        assert torch.allclose(model.schedule(steps), sched.sigmas.float(), atol=1e-6, rtol=0)


def test_wan_schedule_is_shifted_linear(adapters):
    model = adapters[0]["wan"]
    s = model.schedule(4).double()
    u = torch.linspace(1, 0, 5, dtype=torch.float64)
    assert model.flow_shift == 3.0
    assert torch.allclose(s, 3 * u / (1 + 2 * u), atol=1e-7)


# --------------------------------------------------------------------------------------------------
# velocity properties


@pytest.mark.parametrize("family", FAMILIES)
def test_velocity_deterministic_and_batch_independent(adapters, conds, family):
    model = adapters[0][family]
    x = model.init_noise(2, torch.Generator().manual_seed(1))
    sig = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        v = model.velocity(x, sig, conds[family])
        assert torch.equal(v, model.velocity(x, sig, conds[family]))
        v1 = model.velocity(x[1:], sig[1:], gather_cond(conds[family], torch.tensor([1])))
    assert torch.allclose(v[1:], v1, atol=1e-5, rtol=0)
    assert not torch.allclose(v[0], v[1])  # the rows really are different samples


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_cfg_is_affine_in_the_guidance_scale(adapters, conds, family):
    """v(w) = v_u + w·(v_c − v_u): equal steps in w give equal steps in v; w = 1 is the conditional branch alone."""
    model = adapters[0][family]
    x = model.init_noise(2, torch.Generator().manual_seed(2))
    sig = torch.full((2,), 0.5)
    old = model.guidance_scale
    try:
        vs = {}
        for w in (1.0, 2.0, 3.0):
            model.guidance_scale = w
            with torch.no_grad():
                vs[w] = model.velocity(x, sig, conds[family])
    finally:
        model.guidance_scale = old
    assert torch.allclose(vs[3.0] - vs[2.0], vs[2.0] - vs[1.0], atol=2e-5)
    assert (vs[3.0] - vs[2.0]).abs().max() > 1e-3  # the negative branch matters


def test_flux_guidance_embedding_is_used(adapters, conds):
    model = adapters[0]["flux"]
    x = model.init_noise(1, torch.Generator().manual_seed(4))
    cond = gather_cond(conds["flux"], torch.tensor([0]))
    old = model.guidance_scale
    try:
        with torch.no_grad():
            model.guidance_scale = 1.0
            v1 = model.velocity(x, torch.tensor([0.5]), cond)
            model.guidance_scale = 3.5
            v35 = model.velocity(x, torch.tensor([0.5]), cond)
    finally:
        model.guidance_scale = old
    assert (v1 - v35).abs().max() > 1e-4


def test_flux_noise_matches_fluxpipeline(adapters):
    model = adapters[0]["flux"]
    x = model.init_noise(2, torch.Generator().manual_seed(7))
    ref, _ = model.pipe.prepare_latents(2, model.channels, 32, 32, torch.float32, "cpu",
                                        torch.Generator().manual_seed(7))
    assert torch.equal(x, ref)


# --------------------------------------------------------------------------------------------------
# on-policy sanity check (METHODS.md §3.8): re-scoring at unchanged weights gives ratio 1

ETAS = {"euler": 0.0, "flow_sde": 0.7, "dance_sde": 0.3, "cps": 0.8, "ddim_sde": 0.7}


def _ratio_check(model, cond, kernel: str, steps: int = 3) -> None:
    sig = model.schedule(steps)
    eta = live_eta(kernel, sig, eta_schedule(steps, ETAS[kernel]))  # as the trainer: ddim_sde's σ = 1 step is Euler
    cond_index = torch.tensor([0, 0, 1])
    x0 = model.init_noise(3, torch.Generator().manual_seed(11))
    traj = sample(model.velocity, x0, sig, cond, eta=eta, kernel=kernel, generator=torch.Generator().manual_seed(12),
                  cond_index=cond_index)
    cond_b = gather_cond(traj.cond, traj.cond_index)
    stochastic = [t for t in range(steps) if float(traj.eta[t]) > 0]
    if kernel == "euler":
        assert not stochastic and torch.equal(traj.log_probs, torch.zeros_like(traj.log_probs))
        return
    assert stochastic
    b = traj.batch_size
    for t in stochastic:
        with torch.no_grad():
            lp, tr = step_log_prob(model.velocity, traj.latents[:, t], traj.latents[:, t + 1],
                                   traj.sigmas[t].expand(b), traj.sigmas[t + 1].expand(b), traj.eta[t].expand(b),
                                   cond_b, kernel=kernel)
        ratio = torch.exp(lp - traj.log_probs[:, t])
        assert (ratio - 1).abs().max() < 1e-6, (kernel, t, ratio)
        assert (tr.std > 0).all()


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("family", FAMILIES)
def test_on_policy_ratio_is_one(adapters, conds, family, kernel):
    _ratio_check(adapters[0][family], conds[family], kernel)


def test_on_policy_ratio_is_one_with_trained_lora(tiny_sd3_dir):  # noqa: F811
    model = _load("sd3", tiny_sd3_dir)
    model.add_lora(rank=4, alpha=8)
    with torch.no_grad():
        for p in model.lora_parameters():
            p.add_(0.05 * torch.randn_like(p))
    cond = model.encode(PROMPTS)
    for kernel in ("flow_sde", "cps"):
        _ratio_check(model, cond, kernel)


# -------------------------- initial noise: drawn in the pipeline dtype (as prepare_latents does), returned in fp32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_init_noise_is_the_pipelines_noise(tiny_sd3_dir, tiny_flux_dir, family, dtype):  # noqa: F811
    """SD3 and FLUX pipelines draw the start with ``randn_tensor(shape, generator, device, prompt_embeds.dtype)``; the
    adapters drew fp32, so a bf16 model's seed did not give the pipeline's start. Now the same seed gives the
    pipeline's noise (packed for FLUX), upcast to fp32; fp32 models are unchanged."""
    directory = {"sd3": tiny_sd3_dir, "flux": tiny_flux_dir}[family]
    model = load_model(family, str(directory), dtype=dtype, max_sequence_length=SEQ, **TINY_SIZES[family])
    pipe = model.pipe
    with torch.no_grad():  # the dtype the pipeline hands to prepare_latents
        if family == "sd3":
            pipe_dtype = pipe.encode_prompt(prompt=PROMPTS[:1], prompt_2=None, prompt_3=None, device="cpu",
                                            do_classifier_free_guidance=False, max_sequence_length=SEQ)[0].dtype
        else:
            pipe_dtype = pipe.encode_prompt(prompt=PROMPTS[:1], prompt_2=None, device="cpu",
                                            max_sequence_length=SEQ)[0].dtype
    assert pipe_dtype == dtype

    x = model.init_noise(3, torch.Generator().manual_seed(7))
    channels = pipe.transformer.config.in_channels // (4 if family == "flux" else 1)
    ref = pipe.prepare_latents(3, channels, TINY_SIZES[family]["height"], TINY_SIZES[family]["width"], pipe_dtype,
                               "cpu", torch.Generator().manual_seed(7))
    ref = ref[0] if family == "flux" else ref  # FluxPipeline also returns the image ids
    assert x.dtype == torch.float32 and ref.dtype == dtype
    assert torch.equal(x, ref.float())


# --------------------------------------------------------------------------------------------------
# loading refuses, in one line, what would otherwise fail later or be silently ignored


def _one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)


PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "wan": "WanPipeline"}


@pytest.mark.parametrize("family,other", [(f, o) for f in FAMILIES for o in FAMILIES if f != o])
def test_a_checkpoint_of_another_family_is_refused_naming_its_family(
        tiny_sd3_dir, tiny_flux_dir, tiny_wan_dir, family, other):  # noqa: F811
    """`--model flux --path <sd3 dir>` loaded an SD3 transformer under FluxPipeline (AttributeError at the first
    forward) and wan on an SD3 directory crashed inside diffusers; now model_index.json is read first."""
    dirs = {"sd3": tiny_sd3_dir, "flux": tiny_flux_dir, "wan": tiny_wan_dir}
    with pytest.raises(UserError) as e:
        _load(family, dirs[other])
    _one_line(e, f"is a {PIPELINES[other]}", f"not a {family} checkpoint", f"--model {other}")


def _relabelled(src, dst, class_name):
    """A copy of the checkpoint ``src`` whose model_index.json names ``class_name`` as its pipeline."""
    import json
    import shutil

    ckpt = shutil.copytree(src, dst)
    index = ckpt / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": class_name}))
    return ckpt


def test_the_transformer_class_is_checked_after_loading(tiny_sd3_dir, tmp_path):  # noqa: F811
    """When model_index.json does not tell (here: it claims FluxPipeline), the loaded transformer does."""
    ckpt = _relabelled(tiny_sd3_dir, tmp_path / "sd3_as_flux", "FluxPipeline")
    with pytest.raises(UserError) as e:
        _load("flux", ckpt)
    _one_line(e, "SD3Transformer2DModel transformer", "FluxTransformer2DModel", "--model sd3")


def test_a_pipeline_no_family_loads_is_refused(tiny_sd3_dir, tmp_path):  # noqa: F811
    ckpt = _relabelled(tiny_sd3_dir, tmp_path / "sdxl", "StableDiffusionXLPipeline")
    with pytest.raises(UserError) as e:
        _load("sd3", ckpt)
    _one_line(e, "StableDiffusionXLPipeline", "no flowalign model family", "sd3 (StableDiffusion3Pipeline)")


def test_pipeline_class_names_map_to_their_family():
    from flowalign.models.base import _families, _pipeline_family

    fams = _families()
    assert {f: p for f, (p, _) in fams.items()} == PIPELINES  # the shapes families have no diffusers pipeline
    cases = {"StableDiffusion3Pipeline": "sd3", "StableDiffusion3Img2ImgPipeline": "sd3", "FluxPipeline": "flux",
             "FluxImg2ImgPipeline": "flux", "WanPipeline": "wan", "WanImageToVideoPipeline": "wan",
             "Flux2Pipeline": None, "StableDiffusionPipeline": None, "StableDiffusionXLPipeline": None,
             "Wan": None, "CogVideoXPipeline": None}
    assert {c: _pipeline_family(c, fams) for c in cases} == cases


@pytest.mark.parametrize("family", FAMILIES)
def test_loader_arguments_are_checked_by_name(family):
    """`from_pretrained(**kwargs)` let check_kwargs accept any name and diffusers ignore a typo; the loaders now take
    explicit arguments, so model.kwargs / --model-arg typos are refused in one line before anything loads."""
    import inspect

    from flowalign.models import resolve
    from flowalign.rewards.catalog import check_kwargs

    fn = resolve(family).from_pretrained
    params = inspect.signature(fn).parameters
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values())
    assert {"variant", "revision", "use_safetensors", "local_files_only"} <= set(params)
    with pytest.raises(UserError) as e:
        check_kwargs(fn, {"max_seqence_length": 16}, f"--model-arg: model {family!r}")
    _one_line(e, "'max_seqence_length'", "did you mean 'max_sequence_length'")
    if family == "flux":  # SD3 and Wan take a negative prompt, guidance-distilled FLUX does not
        with pytest.raises(UserError, match="'negative_prompt'"):
            check_kwargs(fn, {"negative_prompt": "ugly"}, "model.kwargs (flux)")


def test_loading_options_reach_diffusers(tiny_sd3_dir):  # noqa: F811
    model = _load("sd3", tiny_sd3_dir, use_safetensors=True, local_files_only=True, revision="main")
    assert model.latent_shape == (4, 16, 16)  # a local directory: revision is not used, safetensors are there
    with pytest.raises(UserError) as e:  # forwarded: diffusers looks for *.fp16.safetensors files
        _load("sd3", tiny_sd3_dir, variant="fp16")
    _one_line(e, "cannot load the sd3 pipeline", "variant")
    for bad in (dict(use_safetensors="yes"), dict(local_files_only=1), dict(variant=""), dict(revision=[1])):
        with pytest.raises(UserError) as e:
            _load("sd3", tiny_sd3_dir, **bad)
        _one_line(e, next(iter(bad)))


def test_missing_weights_is_one_line_without_diffusers_interim_lines(tiny_sd3_dir, tmp_path, capfd):  # noqa: F811
    """diffusers logs "An error occurred while trying to fetch …" and "Defaulting to unsafe serialization" before it
    raises, and its error names only the .bin file it tried last; the loader holds those lines and names both files."""
    import shutil

    broken = tmp_path / "sd3"
    shutil.copytree(tiny_sd3_dir, broken)
    for f in (broken / "transformer").glob("*.safetensors"):
        f.unlink()
    capfd.readouterr()
    with pytest.raises(UserError) as e:
        _load("sd3", broken)
    _one_line(e, "no weights file (diffusion_pytorch_model.safetensors or .bin)", str(broken / "transformer"))
    err = capfd.readouterr().err
    assert "unsafe serialization" not in err and "An error occurred" not in err, err


def test_held_library_logs_replay_on_success_only():
    import logging

    from flowalign.models.base import _library_logs_held

    seen: list[str] = []

    class _List(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    root, handler = logging.getLogger("diffusers"), _List()
    root.addHandler(handler)
    try:
        log = logging.getLogger("diffusers.some.module")
        with _library_logs_held("diffusers"):
            log.warning("kept warning")
            assert seen == []  # held, not yet shown
        assert seen == ["kept warning"]
        with pytest.raises(RuntimeError):
            with _library_logs_held("diffusers"):
                log.warning("dropped warning")
                raise RuntimeError("boom")
        assert seen == ["kept warning"]
        assert handler in root.handlers and len([h for h in root.handlers if type(h).__name__ == "_Hold"]) == 0
    finally:
        root.removeHandler(handler)


SIZE_ARGS = [("height", 0), ("height", -32), ("width", 0), ("max_sequence_length", 0), ("max_sequence_length", -1),
             ("height", 32.5), ("height", True), ("height", "32")]


@pytest.mark.parametrize("family,key,value", [(f, k, v) for f in FAMILIES for k, v in SIZE_ARGS]
                         + [("wan", "num_frames", -3), ("wan", "num_frames", 0)])
def test_sizes_must_be_positive_integers(adapters, tmp_path, family, key, value):
    """0 and negative sizes passed the multiple-of checks and failed inside the transformer (or the text encoder)."""
    kw = {"max_sequence_length": SEQ, **TINY_SIZES[family], key: value}
    with pytest.raises(UserError) as e:  # before loading: the directory does not exist
        load_model(family, str(tmp_path / "nowhere"), **kw)
    _one_line(e, f"{key}={value!r}", ">= 1")
    model = adapters[0][family]
    with pytest.raises(UserError) as e:  # the adapter's constructor checks too
        type(model)(model.pipe, **kw)
    _one_line(e, f"{key}={value!r}", ">= 1")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_a_non_finite_or_negative_guidance_scale_is_refused_at_load(bad):
    """A NaN scale passed straight to the library loader gave NaN images without a word."""
    from flowalign.models import load_model

    with pytest.raises(UserError, match="guidance_scale"):
        load_model("shapes", guidance_scale=bad)


# --------------------------------------------------------------------------------------------------
# checkpoints the adapters cannot sample: refused from their config.json before loading, and by the adapter after


def _variant_dir(src, dst, class_name, **transformer_config):
    """A copy of ``src`` whose model_index.json names ``class_name`` and whose transformer/config.json is changed, with
    the transformer's weights removed: a refusal from the configs must come before anything loads."""
    import json

    ckpt = _relabelled(src, dst, class_name)
    cfg = ckpt / "transformer" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **transformer_config}))
    for f in (ckpt / "transformer").glob("*.safetensors"):
        f.unlink()
    return ckpt


@pytest.mark.parametrize("family,class_name,config,words", [
    # FLUX.1 Fill: latent + masked-image latent + packed mask (384 for 64 out); Canny / Depth: latent + control (128)
    ("flux", "FluxFillPipeline", dict(in_channels=36, out_channels=16), ["36 input channels", "16 output", "16 of"]),
    ("flux", "FluxControlPipeline", dict(in_channels=32, out_channels=16), ["32 input channels", "16 output"]),
    # Wan2.1 I2V: latent + conditioning frames' latents + mask (36 for z_dim 16; 2·4 + 4 = 12 for the tiny VAE)
    ("wan", "WanImageToVideoPipeline", dict(in_channels=12, out_channels=4), ["12 input channels", "z_dim=4"]),
])
def test_image_conditioned_variants_are_refused_before_loading(tiny_flux_dir, tiny_wan_dir, tmp_path, caplog,
                                                               family, class_name, config, words):  # noqa: F811
    """FluxFillPipeline / WanImageToVideoPipeline checkpoints were loaded as variants with a warning and crashed with a
    RuntimeError at the first forward; their transformer's input channels now refuse them from the configs."""
    src = {"flux": tiny_flux_dir, "wan": tiny_wan_dir}[family]
    ckpt = _variant_dir(src, tmp_path / class_name, class_name, **config)
    with pytest.raises(UserError) as e:  # the weights are gone: loading would fail with another message
        _load(family, ckpt)
    _one_line(e, "image-conditioned variant", "cannot sample", *words)
    assert "loads it as" not in caplog.text  # no "loading it anyway" warning before the refusal


def test_image_conditioned_variants_are_refused_after_loading(adapters):
    """Where the configs cannot be read before loading (a hub id), the adapter refuses the loaded pipeline."""
    from diffusers import FluxFillPipeline, FluxTransformer2DModel, WanImageToVideoPipeline, WanTransformer3DModel

    models, _ = adapters
    flux, wan = models["flux"].pipe, models["wan"].pipe
    shared = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    fill = FluxFillPipeline(**{k: flux.components[k] for k in shared}, transformer=FluxTransformer2DModel(
        patch_size=1, in_channels=36, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6)))
    with pytest.raises(UserError) as e:
        type(models["flux"])(fill, max_sequence_length=SEQ, **TINY_SIZES["flux"])
    _one_line(e, "image-conditioned variant", "36 input channels")
    i2v = WanImageToVideoPipeline(
        tokenizer=wan.tokenizer, text_encoder=wan.text_encoder, vae=wan.vae, scheduler=wan.scheduler,
        image_encoder=None, image_processor=None, transformer=WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12, out_channels=4,
            text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32))
    with pytest.raises(UserError) as e:
        type(models["wan"])(i2v, max_sequence_length=SEQ, **TINY_SIZES["wan"])
    _one_line(e, "image-conditioned variant", "12 input channels", "z_dim=4")


def _refuse_loading(monkeypatch):
    """Make every family's pipeline loading fail the test: the size must be refused from the configs first."""
    import diffusers

    def boom(*a, **k):
        raise AssertionError("the pipeline was loaded before the size was refused")

    for name in PIPELINES.values():
        monkeypatch.setattr(getattr(diffusers, name), "from_pretrained", classmethod(boom))


# the tiny checkpoints: SD3 VAE ×2, patch 2, pos_embed_max_size 32 (at most 32·4 = 128 px); FLUX VAE ×2, packed 2×2
# (multiples of 4); Wan VAE ×8 spatial, ×4 temporal, patch 2 (multiples of 16, 4k + 1 frames)
SIZE_REFUSALS = [
    ("sd3", dict(height=160), ["160x32", "pos_embed_max_size=32", "at most 128"]),
    ("sd3", dict(width=136), ["32x136", "at most 128"]),
    ("sd3", dict(height=30), ["multiples of 4", "30x32"]),
    ("flux", dict(width=34), ["multiples of 4", "32x34"]),
    ("wan", dict(height=40), ["multiples of 16", "40x32"]),
    ("wan", dict(num_frames=6), ["4k + 1", "got 6"]),
]


@pytest.mark.parametrize("family,size,words", SIZE_REFUSALS)
def test_sizes_are_checked_against_the_configs_before_loading(tiny_sd3_dir, tiny_flux_dir, tiny_wan_dir, monkeypatch,
                                                              family, size, words):  # noqa: F811
    """SD3's pos_embed_max_size limit was a raw ValueError traceback at the first forward, and the multiple-of checks
    ran only once the whole pipeline had loaded; both now read transformer/ and vae/config.json first."""
    dirs = {"sd3": tiny_sd3_dir, "flux": tiny_flux_dir, "wan": tiny_wan_dir}
    _refuse_loading(monkeypatch)
    with pytest.raises(UserError) as e:
        load_model(family, str(dirs[family]), max_sequence_length=SEQ, **{**TINY_SIZES[family], **size})
    _one_line(e, *words)


@pytest.mark.parametrize("family,size,words", SIZE_REFUSALS)
def test_sizes_are_checked_after_loading_too(adapters, family, size, words):
    """A hub id whose configs are not in the local cache is checked by the adapter, on the loaded modules' configs."""
    model = adapters[0][family]
    with pytest.raises(UserError) as e:
        type(model)(model.pipe, max_sequence_length=SEQ, **{**TINY_SIZES[family], **size})
    _one_line(e, *words)


def test_a_size_at_the_pos_embed_limit_samples(adapters):
    """128 px = pos_embed_max_size (32) patches of 4 px: the largest size the tiny SD3 takes, and it does."""
    model = adapters[0]["sd3"]
    big = type(model)(model.pipe, max_sequence_length=SEQ, height=128, width=32)
    x = big.init_noise(1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert big.velocity(x, torch.tensor([0.5]), big.encode(PROMPTS[:1])).shape == (1, 4, 64, 16)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_max_sequence_length_above_512_is_refused(adapters, tmp_path, family):
    """diffusers' SD3 and FLUX pipelines refuse max_sequence_length > 512 in check_inputs; the adapters call
    encode_prompt directly and accepted it."""
    kw = {**TINY_SIZES[family], "max_sequence_length": 513}
    with pytest.raises(UserError) as e:  # before loading: the directory does not exist
        load_model(family, str(tmp_path / "nowhere"), **kw)
    _one_line(e, "max_sequence_length=513", "512")
    model = adapters[0][family]
    with pytest.raises(UserError) as e:
        type(model)(model.pipe, **kw)
    _one_line(e, "max_sequence_length=513", "512")


# --------------------------------------------------------------------------------------------------
# FLUX without a guidance embedding (schnell): a scale changes nothing, and says so once


def _schnell(flux_pipe):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(1)
    tr = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()
    return FluxPipeline(**{**flux_pipe.components, "transformer": tr})


def test_flux_without_guidance_embedding_warns_once_for_an_explicit_scale(adapters, conds, caplog):
    from flowalign.sample import generate

    models, _ = adapters
    pipe = _schnell(models["flux"].pipe)
    cls = type(models["flux"])
    warned = lambda: [r for r in caplog.records if "no guidance embedding" in r.getMessage()]  # noqa: E731
    kw = dict(max_sequence_length=SEQ, **TINY_SIZES["flux"])
    for quiet in ({}, {"guidance_scale": 3.5}, {"guidance_scale": 0.0}):  # the default, or schnell's documented 0
        model = cls(pipe, **kw, **quiet)
        model.guidance_scale = 0.0
        assert warned() == [], quiet
    model = cls(pipe, **kw)
    x = model.init_noise(1, torch.Generator().manual_seed(0))
    cond = gather_cond(conds["flux"], torch.tensor([0]))
    with torch.no_grad():
        v_default = model.velocity(x, torch.tensor([0.5]), cond)
        generate(model, PROMPTS[:1], [0], steps=1, guidance_scale=9.0)  # --guidance 9
        model.guidance_scale = 7.0
        v_seven = model.velocity(x, torch.tensor([0.5]), cond)
    assert torch.equal(v_default, v_seven)  # no effect, as the warning says
    [record] = warned()  # once per model
    assert record.levelname == "WARNING" and "guidance scales have no effect on it, so guidance_scale=9" in record.getMessage()
    caplog.clear()
    cls(pipe, guidance_scale=4.5, **kw)  # a config's model.guidance (default 4.5) is explicit too
    assert len(warned()) == 1
    caplog.clear()
    models["flux"].guidance_scale, old = 9.0, models["flux"].guidance_scale  # FLUX.1-dev: the scale is an input
    models["flux"].guidance_scale = old
    assert warned() == []


# --------------------------------------------------------------------------------------------------
# default number of sampling steps


def test_each_family_declares_its_pipelines_default_steps(adapters):
    """The commands used a hard-coded 10 steps for sd3/flux/wan while their help said "the model's"."""
    from flowalign.models import load_model as load, resolve
    from flowalign.sample import resolve_steps

    assert {f: resolve(f).default_steps for f in FAMILIES} == {"sd3": 28, "flux": 28, "wan": 50}
    for f in FAMILIES:
        assert resolve_steps(adapters[0][f], None) == adapters[0][f].default_steps
        assert resolve_steps(adapters[0][f], 3) == 3
    shapes = load("shapes")
    assert shapes.default_steps == shapes.config.sample_steps == resolve_steps(shapes, None) == 12
    with pytest.raises(UserError, match="--steps"):
        resolve_steps(object(), None)


# --------------------------------------------------------------------------------------------------
# CFG switch and the VAE latent normalisation (mutation audit)


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_guidance_one_runs_the_conditional_branch_alone(adapters, conds, family):
    """``uses_cfg``: w > 1 batch-doubles [uncond, cond], w = 1 runs one conditional forward (as diffusers' ``w > 1``
    test); ``step_inputs`` counts the same rows, so the memory bench sizes what ``velocity`` runs."""
    from flowalign.models import sd3, wan
    from flowalign.models.base import uses_cfg

    assert not uses_cfg(1.0) and uses_cfg(1.0 + 1e-6) and not uses_cfg(0.0)
    model = adapters[0][family]
    x = model.init_noise(2, torch.Generator().manual_seed(5))  # [2, *latent]
    rows = []
    hook = model.transformer.register_forward_hook(
        lambda m, a, kw, out: rows.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    old = model.guidance_scale
    try:
        for w in (1.0, 1.5):
            model.guidance_scale = w
            with torch.no_grad():
                model.velocity(x, torch.full((2,), 0.5), conds[family])
    finally:
        model.guidance_scale = old
        hook.remove()
    assert rows == [2, 4]
    step_inputs = {"sd3": sd3.step_inputs, "wan": wan.step_inputs}[family]
    cfg = dict(in_channels=4, joint_attention_dim=8, pooled_projection_dim=8, text_dim=8)
    for w, r in ((1.0, 3), (1.5, 6)):
        assert step_inputs(cfg, 3, 32, 32, torch.float32, guidance_scale=w)["hidden_states"].shape[0] == r


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_images_is_the_inverse_of_decodes_latent_normalisation(adapters, family):
    """``encode_images`` / ``encode_videos`` give the VAE posterior mean in the pipeline's latent space:
    ``decode`` (pinned to the diffusers pipeline above) of it is the VAE's own reconstruction of the raw mean
    (SD3/FLUX: (z − shift)·scale, FLUX 2×2-packed; Wan: (z − mean)/std per channel)."""
    model = adapters[0][family]
    vae = model.pipe.vae
    g = torch.Generator().manual_seed(9)
    h, w = TINY_SIZES[family]["height"], TINY_SIZES[family]["width"]
    with torch.no_grad():
        if family == "wan":
            pixels = torch.rand(2, TINY_SIZES["wan"]["num_frames"], 3, h, w, generator=g)  # [B, F, 3, H, W]
            z = model.encode_videos(pixels)  # [B, C, F', h, w]
            raw = vae.encode(pixels.permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.mean  # [B, C, F', h, w]
            ref = vae.decode(raw, return_dict=False)[0].permute(0, 2, 1, 3, 4)  # [B, F, 3, H, W]
        else:
            pixels = torch.rand(2, 3, h, w, generator=g)  # [B, 3, H, W]
            z = model.encode_images(pixels)  # [B, C, h, w] (FLUX: [B, L, 4C])
            raw = vae.encode(pixels * 2 - 1).latent_dist.mean  # [B, C, h, w]
            ref = vae.decode(raw, return_dict=False)[0]  # [B, 3, H, W]
        ref = (ref.float() / 2 + 0.5).clamp(0, 1)
        out = model.decode(z)
    assert z.shape == (2, *model.latent_shape) and z.dtype == torch.float32
    if family == "flux":
        from flowalign.models.flux import pack

        raw = pack(raw)  # [B, L, 4C]
    assert not torch.allclose(z, raw, atol=1e-3)  # the normalisation is not the identity here
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()
