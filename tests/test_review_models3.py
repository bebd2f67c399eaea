"""Review of the SD3 / FLUX adapters against their diffusers pipelines: one regression test per gap (each fails on the
old code): SD3's ``use_dynamic_shifting`` grid, and the initial noise drawn in the pipeline dtype."""

from __future__ import annotations

import pytest
import torch

from flowalign.models import load_model
from tiny_models import TINY_SIZES, tiny_flux_dir, tiny_sd3_dir  # noqa: F401  (fixtures)

SEQ = 16  # T5 max_sequence_length of the tiny models
PROMPTS = ["a red cat on the left of a blue dog", "two small yellow stars"]


@pytest.fixture(scope="module")
def sd3_src():
    from tiny_models import tiny_sd3_pipeline

    return tiny_sd3_pipeline()


# --------------------------------------------------------------------------------------------------
# SD3: a scheduler with use_dynamic_shifting gets the pipeline's μ


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


# --------------------------------------------------------------------------------------------------
# initial noise: drawn in the pipeline dtype (as prepare_latents does), returned in fp32


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
