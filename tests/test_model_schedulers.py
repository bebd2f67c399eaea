"""The SD3 / FLUX / Wan adapters' sigma grids against their diffusers schedulers' config options.

(a) options flowalign reproduces: the adapter's grid equals the scheduler's own ``set_timesteps`` sigmas, called the way
    the pipeline calls it, and a whole Euler run equals the pipeline's;
(b) options it does not reproduce: loading refuses them with a one-line ``UserError``;
(c) default configs keep exactly the old grids.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from flowalign.errors import UserError
from flowalign.models import load_model
from tiny_models import TINY_SIZES, tiny_flux_dir, tiny_sd3_dir, tiny_wan_dir  # noqa: F401  (fixtures)

SEQ = 16  # T5 / UMT5 max_sequence_length of the tiny models
PROMPTS = ["a red cat on the left of a blue dog", "two small yellow stars"]
STEPS = (3, 10, 28)
# Dynamic-shift constants away from the defaults, so the tests see each one read (tiny SD3/FLUX latents: 64 tokens).
DYNAMIC = dict(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256, base_shift=0.3, max_shift=1.2)


@pytest.fixture(scope="module")
def srcs():
    from tiny_models import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_wan_pipeline

    return {"sd3": tiny_sd3_pipeline(), "flux": tiny_flux_pipeline(), "wan": tiny_wan_pipeline()}


@pytest.fixture(scope="module")
def sd3_src():
    from tiny_models import tiny_sd3_pipeline

    return tiny_sd3_pipeline()


def _euler(**config):
    """FlowMatchEulerDiscreteScheduler from a config dict (``from_config`` keeps extra keys such as sigma_min)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(config)


def _adapter(srcs, family, scheduler):
    """The family's adapter on the tiny pipeline with ``scheduler`` swapped in (what loading a checkpoint with that
    scheduler config gives)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, WanPipeline

    from flowalign.models import resolve

    cls = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline, "wan": WanPipeline}[family]
    pipe = cls(**{**srcs[family].components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    return resolve(family)(pipe, max_sequence_length=SEQ, **TINY_SIZES[family])


def _pipeline_sigmas(family, model, steps):
    """The sigmas the family's diffusers pipeline sets on a fresh copy of the adapter's scheduler for ``steps``."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    cfg = model.pipe.scheduler.config
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    if family == "flux":  # FluxPipeline.__call__, step 5: sigmas and μ always passed
        mu = calculate_shift(model.latent_shape[0], cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        retrieve_timesteps(sched, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    else:  # StableDiffusion3Pipeline.__call__, step 5: μ only with dynamic shifting
        kwargs = {}
        if cfg.get("use_dynamic_shifting", False):
            p = model.transformer.config.patch_size
            kwargs["mu"] = calculate_shift((model.latent_shape[1] // p) * (model.latent_shape[2] // p),
                                           cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                           cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
        retrieve_timesteps(sched, steps, "cpu", **kwargs)
    return sched.sigmas.float()


# -----------------------------------------------------------------------------------------------------------------
# SD3 with use_dynamic_shifting gets the pipeline's μ; FLUX without it (FLUX.1-schnell) keeps its static shift


@pytest.mark.parametrize("shifting", ["static", "exponential", "linear"])
def test_sd3_dynamic_shifting_schedule_matches_the_pipeline(sd3_src, shifting):
    """StableDiffusion3Pipeline passes ``mu = calculate_shift((h/p)·(w/p), …)`` to ``set_timesteps`` when the
    scheduler has ``use_dynamic_shifting``; the adapter used the static double-shift grid for every SD3 scheduler. The
    reference is the pipeline itself (3-step Euler run, its scheduler's sigmas) and its scheduler called the way the
    pipeline calls it for longer grids. A static scheduler must keep the ``sd3_diffusers`` grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

    from flowalign.models.sd3 import SD3Model
    from flowalign.samplers import sample

    dynamic = shifting != "static"
    # Constants away from the defaults, so the test sees that each is read (tiny latent: 16×16, patch 2 → 64 tokens).
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=dynamic, base_image_seq_len=16, max_image_seq_len=256, base_shift=0.3,
        max_shift=1.2, time_shift_type="linear" if shifting == "linear" else "exponential",
    )
    pipe = StableDiffusion3Pipeline(**{**sd3_src.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    model = SD3Model(pipe, guidance_scale=4.5, max_sequence_length=SEQ, **TINY_SIZES["sd3"])

    x0 = model.init_noise(2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = pipe(PROMPTS, latents=x0.clone(), num_inference_steps=3, guidance_scale=4.5, max_sequence_length=SEQ,
                   output_type="latent", **TINY_SIZES["sd3"]).images
        sigmas = model.schedule(3)
        assert torch.allclose(sigmas, pipe.scheduler.sigmas.float(), atol=1e-7, rtol=0), (sigmas, pipe.scheduler.sigmas)
        final = sample(model.velocity, x0, sigmas, model.encode(PROMPTS), eta=0.0, kernel="euler").final
    assert torch.allclose(final, ref, atol=2e-5, rtol=0), (final - ref).abs().max()

    cfg, p = pipe.scheduler.config, pipe.transformer.config.patch_size
    h, w = (TINY_SIZES["sd3"][k] // pipe.vae_scale_factor for k in ("height", "width"))
    kwargs = {}
    if dynamic:  # as in StableDiffusion3Pipeline.__call__, step 5
        kwargs["mu"] = calculate_shift((h // p) * (w // p), cfg.get("base_image_seq_len", 256),
                                       cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                       cfg.get("max_shift", 1.16))
    for steps in (10, 28):
        sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
        retrieve_timesteps(sched, steps, "cpu", sigmas=None, **kwargs)
        assert torch.allclose(model.schedule(steps), sched.sigmas.float(), atol=1e-7, rtol=0), steps


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flux_static_shift_scheduler_samples_like_fluxpipeline(shift):
    """FLUX.1-schnell's scheduler has ``use_dynamic_shifting=False``: FluxPipeline passes μ but the scheduler ignores it
    and applies its static shift. The adapter used the dynamic (μ) grid for every FLUX model, so schnell sampled on the
    wrong sigmas; with a no-guidance-embedding transformer the whole Euler run must equal the pipeline's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from flowalign.models.flux import FluxModel
    from flowalign.samplers import sample
    from tiny_models import tiny_flux_pipeline

    src = tiny_flux_pipeline()
    torch.manual_seed(1)
    transformer = FluxTransformer2DModel(  # schnell-like: no guidance embedding
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
    ).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False),
                        vae=src.vae, text_encoder=src.text_encoder, tokenizer=src.tokenizer,
                        text_encoder_2=src.text_encoder_2, tokenizer_2=src.tokenizer_2, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    model = FluxModel(pipe, max_sequence_length=16, **TINY_SIZES["flux"])
    prompts = ["a red cat", "two small yellow stars"]
    x0 = model.init_noise(2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = pipe(prompts, latents=x0.clone(), num_inference_steps=3, max_sequence_length=16, output_type="latent",
                   **TINY_SIZES["flux"]).images
        sigmas = model.schedule(3)
        assert torch.allclose(sigmas, pipe.scheduler.sigmas.float(), atol=1e-6, rtol=0), (sigmas, pipe.scheduler.sigmas)
        final = sample(model.velocity, x0, sigmas, model.encode(prompts), eta=0.0, kernel="euler").final
    assert torch.allclose(final, ref, atol=2e-5, rtol=0), (final - ref).abs().max()


# -----------------------------------------------------------------------------------------------------------------
# (a) options flowalign reproduces: the grid is diffusers' grid

IMPLEMENTED = {
    "shift_terminal": dict(shift=3.0, shift_terminal=0.1),
    "karras": dict(shift=3.0, use_karras_sigmas=True),
    "exponential": dict(shift=3.0, use_exponential_sigmas=True),
    "beta": dict(shift=3.0, use_beta_sigmas=True),
    "karras+terminal": dict(shift=3.0, use_karras_sigmas=True, shift_terminal=0.05),
    "exponential+config_sigma_min": dict(shift=3.0, use_exponential_sigmas=True, sigma_min=0.02),
    "num_train_timesteps": dict(shift=3.0, num_train_timesteps=500),
    "dynamic_exponential": dict(**DYNAMIC),
    "dynamic_linear": dict(**DYNAMIC, time_shift_type="linear"),
    "dynamic_linear+terminal": dict(**DYNAMIC, time_shift_type="linear", shift_terminal=0.1),
    "dynamic+beta": dict(**DYNAMIC, use_beta_sigmas=True),
    "dynamic+karras+terminal": dict(**DYNAMIC, use_karras_sigmas=True, shift_terminal=0.02),
}


@pytest.mark.parametrize("case", list(IMPLEMENTED))
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_grid_option_gives_the_diffusers_grid(srcs, family, case):
    """The adapter's grid == the scheduler's ``set_timesteps`` sigmas called as the pipeline calls it (1e-6)."""
    model = _adapter(srcs, family, _euler(**IMPLEMENTED[case]))
    for steps in STEPS:
        ours, ref = model.schedule(steps), _pipeline_sigmas(family, model, steps)
        assert ours.dtype == torch.float32 and ours.shape == ref.shape == (steps + 1,)
        assert torch.allclose(ours, ref, atol=1e-6, rtol=0), (steps, ours, ref)


@pytest.mark.parametrize("family", ["sd3", "flux", "wan"])
def test_euler_run_equals_the_pipeline_with_nondefault_options(srcs, family):
    """A whole 3-step Euler run on the adapter's grid equals the pipeline's own run with ``num_train_timesteps=500`` (the
    model then gets the timestep σ·500, not 1000·σ) and, for SD3/FLUX, ``shift_terminal`` (Wan: flowalign's own grid
    replaces the scheduler's by design, so the run uses the pipeline's sigmas to check the timestep alone)."""
    from flowalign.samplers import sample

    options = dict(shift=3.0, num_train_timesteps=500)
    if family != "wan":
        options["shift_terminal"] = 0.1
    model = _adapter(srcs, family, _euler(**options))
    pipe = model.pipe
    x0 = model.init_noise(2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = pipe(PROMPTS, latents=x0.clone(), num_inference_steps=3, guidance_scale=model.guidance_scale,
                   max_sequence_length=SEQ, output_type="latent", **TINY_SIZES[family])
        ref = out.frames if family == "wan" else out.images
        sigmas = pipe.scheduler.sigmas.float()
        if family != "wan":
            assert torch.allclose(model.schedule(3), sigmas, atol=1e-6, rtol=0), (model.schedule(3), sigmas)
            sigmas = model.schedule(3)
        final = sample(model.velocity, x0, sigmas, model.encode(PROMPTS), eta=0.0, kernel="euler").final
    assert (final - x0).abs().max() > 0.1  # the comparison is not vacuous
    assert torch.allclose(final, ref, atol=2e-5, rtol=0), (final - ref).abs().max()


# -----------------------------------------------------------------------------------------------------------------
# (b) options flowalign does not reproduce: refused at load time, in one line


def _assert_one_line_refusal(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg, msg
    for w in words:
        assert w in msg, (w, msg)


REFUSED_EULER = {
    "invert_sigmas": dict(shift=3.0, invert_sigmas=True),
    "stochastic_sampling": dict(shift=3.0, stochastic_sampling=True),
}


@pytest.mark.parametrize("option", list(REFUSED_EULER))
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_unreproduced_euler_option_is_refused(srcs, family, option):
    with pytest.raises(UserError) as e:
        _adapter(srcs, family, _euler(**REFUSED_EULER[option]))
    _assert_one_line_refusal(e, family, f"{option}=True", "not support")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_other_scheduler_class_is_refused(srcs, family):
    """SD3/FLUX grids are FlowMatchEulerDiscreteScheduler's; a Heun (or any other) scheduler samples on another grid."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    with pytest.raises(UserError) as e:
        _adapter(srcs, family, FlowMatchHeunDiscreteScheduler(shift=3.0))
    _assert_one_line_refusal(e, family, "FlowMatchHeunDiscreteScheduler", "FlowMatchEulerDiscreteScheduler")


def _unipc(**kw):
    from diffusers import UniPCMultistepScheduler

    base = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0)
    return UniPCMultistepScheduler(**{**base, **kw})


REFUSED_WAN = {
    "unipc:use_karras_sigmas": (lambda: _unipc(use_karras_sigmas=True), "use_karras_sigmas=True"),
    "unipc:use_exponential_sigmas": (lambda: _unipc(use_exponential_sigmas=True), "use_exponential_sigmas=True"),
    "unipc:use_beta_sigmas": (lambda: _unipc(use_beta_sigmas=True), "use_beta_sigmas=True"),
    "unipc:use_dynamic_shifting": (lambda: _unipc(use_dynamic_shifting=True), "use_dynamic_shifting=True"),
    "unipc:shift_terminal": (lambda: _unipc(shift_terminal=0.1), "shift_terminal=0.1"),
    "unipc:use_flow_sigmas": (lambda: _unipc(use_flow_sigmas=False), "use_flow_sigmas=False"),
    "unipc:prediction_type": (lambda: _unipc(prediction_type="epsilon"), "prediction_type='epsilon'"),
    "euler:shift_terminal": (lambda: _euler(shift=3.0, shift_terminal=0.1), "shift_terminal=0.1"),
    "euler:use_karras_sigmas": (lambda: _euler(shift=3.0, use_karras_sigmas=True), "use_karras_sigmas=True"),
    "euler:use_dynamic_shifting": (lambda: _euler(**DYNAMIC), "use_dynamic_shifting=True"),
    "euler:invert_sigmas": (lambda: _euler(shift=3.0, invert_sigmas=True), "invert_sigmas=True"),
}


@pytest.mark.parametrize("case", list(REFUSED_WAN))
def test_wan_scheduler_that_reshapes_its_grid_is_refused(srcs, case):
    """Wan samples on flowalign's ``shifted_linear(T, flow_shift)``; a scheduler whose own grid is more than that shift
    (or not a flow grid) would be silently replaced by a different one."""
    make, words = REFUSED_WAN[case]
    with pytest.raises(UserError) as e:
        _adapter(srcs, "wan", make())
    _assert_one_line_refusal(e, "wan", words, "not support")


@pytest.mark.parametrize("family,option,value", [
    ("sd3", "invert_sigmas", True), ("flux", "stochastic_sampling", True), ("wan", "use_karras_sigmas", True),
])
def test_loading_a_checkpoint_with_a_refused_option(tiny_sd3_dir, tiny_flux_dir, tiny_wan_dir,  # noqa: F811
                                                     tmp_path, family, option, value):
    """The real loading path: the checkpoint's scheduler/scheduler_config.json sets the option."""
    src = {"sd3": tiny_sd3_dir, "flux": tiny_flux_dir, "wan": tiny_wan_dir}[family]
    ckpt = shutil.copytree(src, tmp_path / family)
    path = ckpt / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), option: value}))
    with pytest.raises(UserError) as e:
        load_model(family, str(ckpt), max_sequence_length=SEQ, **TINY_SIZES[family])
    _assert_one_line_refusal(e, family, f"{option}={value!r}")


@pytest.mark.parametrize("scheduler", [
    lambda: _euler(shift=5.0, stochastic_sampling=True),
    lambda: _unipc(flow_shift=5.0, solver_order=3, final_sigmas_type="sigma_min"),
], ids=["euler_stochastic", "unipc_solver_options"])
def test_wan_solver_options_do_not_apply(srcs, scheduler):
    """The scheduler's step rule (UniPC's order and final sigma, Euler's stochastic_sampling) is replaced by flowalign's
    kernel for Wan by design; only its shift matters: the grid is shifted_linear(T, 5)."""
    from flowalign.samplers.schedules import shifted_linear

    model = _adapter(srcs, "wan", scheduler())
    assert torch.equal(model.schedule(10), shifted_linear(10, 5.0))


# -----------------------------------------------------------------------------------------------------------------
# (c) default configs keep exactly the old grids


def test_default_configs_keep_the_old_grids(srcs, tiny_sd3_dir, tiny_flux_dir, tiny_wan_dir):  # noqa: F811
    from flowalign.samplers.schedules import flux_dynamic, sd3_diffusers, shift, shifted_linear

    sd3 = load_model("sd3", str(tiny_sd3_dir), max_sequence_length=SEQ, **TINY_SIZES["sd3"])
    flux = load_model("flux", str(tiny_flux_dir), max_sequence_length=SEQ, **TINY_SIZES["flux"])
    wan = load_model("wan", str(tiny_wan_dir), max_sequence_length=SEQ, **TINY_SIZES["wan"])
    flux_static = {s: _adapter(srcs, "flux", _euler(shift=s)) for s in (1.0, 3.0)}
    sd3_dynamic = _adapter(srcs, "sd3", _euler(**DYNAMIC))
    mu = 0.3 + (64 - 16) * (1.2 - 0.3) / (256 - 16)  # the tiny SD3 latent: (16/2)² = 64 tokens
    for steps in range(1, 61):
        assert torch.equal(sd3.schedule(steps), sd3_diffusers(steps, shift=3.0)), steps
        assert torch.equal(flux.schedule(steps), flux_dynamic(steps, 64)), steps
        for s, model in flux_static.items():
            assert torch.equal(model.schedule(steps), shifted_linear(steps, s)), (steps, s)
        assert torch.equal(wan.schedule(steps), shifted_linear(steps, 3.0)), steps
        u = torch.linspace(1000, 1, steps, dtype=torch.float64) / 1000  # the old SD3 dynamic-shift grid
        old = torch.cat([shift(u, math.exp(mu)), torch.zeros(1, dtype=torch.float64)]).to(torch.float32)
        assert torch.equal(sd3_dynamic.schedule(steps), old), steps


# -----------------------------------------------------------------------------------------------------------------
# (d) the shift: finite and > 0, or a one-line refusal (s = 0, s < 0, NaN gave NaN / non-monotone grids, NaN samples)

BAD_SHIFTS = [0.0, -3.0, float("nan"), float("inf")]


@pytest.mark.parametrize("s", BAD_SHIFTS, ids=["zero", "negative", "nan", "inf"])
def test_shift_grids_refuse_a_shift_that_is_not_finite_and_positive(s):
    from flowalign.samplers.schedules import sd3_diffusers, shift, shifted_linear

    u = torch.linspace(1, 0, 5, dtype=torch.float64)
    for make in (lambda: shift(u, s), lambda: shifted_linear(4, s), lambda: sd3_diffusers(4, shift=s)):
        with pytest.raises(ValueError, match="shift"):
            make()


@pytest.mark.parametrize("s", [0.05, 0.5, 1.0, 3.0, 20.0])
def test_every_positive_shift_gives_a_finite_decreasing_grid(s):
    from flowalign.samplers.schedules import sd3_diffusers, shifted_linear

    for grid in (shifted_linear(9, s), sd3_diffusers(9, shift=s)):
        assert torch.isfinite(grid).all() and grid[0] == 1 and grid[-1] == 0 and (grid[1:] < grid[:-1]).all(), grid


@pytest.mark.parametrize("s", [0.0, -3.0, float("nan"), "abc"], ids=["zero", "negative", "nan", "text"])
def test_wan_flow_shift_argument_is_refused_before_loading(tmp_path, s):
    """`--model-arg flow_shift=0` sampled NaN videos and exited 0; now one line naming the fix, before any load (the
    path does not even exist)."""
    with pytest.raises(UserError) as e:
        load_model("wan", str(tmp_path / "nowhere"), flow_shift=s, max_sequence_length=SEQ, **TINY_SIZES["wan"])
    _assert_one_line_refusal(e, "flow_shift=", "> 0", "3.0 for 480p", "5.0 for 720p")


def test_wan_flow_shift_from_the_checkpoint_is_checked_and_can_be_overridden(srcs):
    from diffusers import WanPipeline

    from flowalign.models.wan import WanModel
    from flowalign.samplers.schedules import shifted_linear

    with pytest.raises(UserError) as e:
        _adapter(srcs, "wan", _unipc(flow_shift=0.0))
    _assert_one_line_refusal(e, "flow_shift=0.0", "scheduler_config.json", "> 0")
    with pytest.raises(UserError) as e:
        _adapter(srcs, "wan", _euler(shift=-1.0))  # a FlowMatchEuler scheduler's shift is the flow shift
    _assert_one_line_refusal(e, "shift=-1.0", "> 0")
    pipe = WanPipeline(**{**srcs["wan"].components, "scheduler": _unipc(flow_shift=0.0)})
    model = WanModel(pipe, flow_shift=5.0, max_sequence_length=SEQ, **TINY_SIZES["wan"])  # the argument wins
    assert torch.equal(model.schedule(6), shifted_linear(6, 5.0))


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("s", [0.0, -3.0, float("nan")], ids=["zero", "negative", "nan"])
def test_static_scheduler_shift_must_be_positive(srcs, family, s):
    with pytest.raises(UserError) as e:
        _adapter(srcs, family, _euler(shift=s))
    _assert_one_line_refusal(e, family, f"shift={s!r}", "scheduler_config.json", "> 0")


def test_dynamic_shifting_ignores_the_static_shift(srcs):
    """With use_dynamic_shifting diffusers never applies ``shift`` (μ shifts the grid), so its value is not refused."""
    model = _adapter(srcs, "flux", _euler(**{**DYNAMIC, "shift": 0.0}))
    assert torch.allclose(model.schedule(6), _pipeline_sigmas("flux", model, 6), atol=1e-6, rtol=0)


@pytest.mark.parametrize("s", [0.0, -1.0, float("nan")], ids=["zero", "negative", "nan"])
def test_shapes_config_shift_must_be_positive(s):
    from flowalign.models.shapes import ShapesModel

    with pytest.raises(UserError) as e:
        ShapesModel.from_config({"shift": s, "num_layers": 1})
    _assert_one_line_refusal(e, "shapes model config shift=", "> 0", "config.json")


# -----------------------------------------------------------------------------------------------------------------
# (e) the step count: a positive integer, or a ValueError (T = 0 gave a one-point "grid" that is not 1 → 0)


@pytest.mark.parametrize("steps", [0, -2, 2.5], ids=["zero", "negative", "fraction"])
def test_every_grid_refuses_a_step_count_that_is_not_a_positive_integer(steps):
    """schedules._check_steps: every grid is [T+1] from 1 to 0, so T ≥ 1; T = 0 would give [1] (shifted_linear) or
    [0] (sd3_diffusers, flux_dynamic), a grid with no step whose first sigma is not 1 (METHODS.md §1)."""
    from flowalign.samplers.schedules import flux_dynamic, sd3_diffusers, shifted_linear

    for make in (lambda: shifted_linear(steps, 3.0), lambda: sd3_diffusers(steps), lambda: flux_dynamic(steps, 1024)):
        with pytest.raises(ValueError, match="steps must be a positive integer"):
            make()
    one = (shifted_linear(1, 3.0), sd3_diffusers(1), flux_dynamic(1, 1024))  # T = 1 is the smallest grid: [1, 0]
    assert all(g.tolist() == [1.0, 0.0] for g in one)


@pytest.mark.parametrize("family,make", [
    ("sd3", lambda: _euler(shift=3.0, invert_sigmas=None, stochastic_sampling=0)),
    ("wan", lambda: _unipc(shift_terminal=0.0, use_karras_sigmas=0)),
], ids=["sd3-euler", "wan-unipc"])
def test_off_options_written_as_none_false_or_zero_are_not_refused(srcs, family, make):
    """``refuse_scheduler_options``: None, False and 0 are one "off" value (diffusers tests ``if config.option``), so a
    scheduler_config.json that writes an option as null / 0 loads and gives the default grid (mutation audit)."""
    default = {"sd3": lambda: _euler(shift=3.0), "wan": _unipc}[family]
    got = _adapter(srcs, family, make()).schedule(10)  # [T+1]
    want = _adapter(srcs, family, default()).schedule(10)  # [T+1]
    assert torch.equal(got, want)
