"""``model.gradient_checkpointing`` (FlowAdapter.set_gradient_checkpointing) and ``flowalign bench train-memory``:
the option leaves every LoRA gradient and a whole training run bitwise unchanged, really recomputes the blocks,
and keeps less for the backward; the bench's byte count is exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flowalign import config as C
from flowalign.bench_memory import measure, saved_bytes
from flowalign.errors import UserError
from flowalign.models import load_model
from flowalign.models.shapes import ShapesModel
from tiny_models import TINY_SIZES, tiny_flux_dir, tiny_sd3_dir, tiny_wan_dir  # noqa: F401  (fixtures)

from cli_checks import fails as _fails
from test_train_update import ROOT, SMALL


def test_saved_bytes_counts_each_saved_storage_once_and_skips_parameters():
    a = torch.randn(1000, requires_grad=True)
    with saved_bytes() as seen:
        b = a.exp()  # exp saves its output: 4,000 bytes
        c = b * b  # mul saves both operands, the same storage
    assert sum(seen.values()) == 4000
    c.sum().backward()  # the hooks passed the tensors through unchanged
    assert torch.allclose(a.grad, 2 * torch.exp(2 * a.detach()))
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with saved_bytes(lin.parameters()) as seen:
        lin(x).sum()  # saves the input (for the weight's gradient) and the weight (a parameter: skipped)
    assert sum(seen.values()) == 4 * 8 * 4


_SMALL_SHAPES = {"num_layers": 2, "num_heads": 2, "head_dim": 16, "text_dim": 32, "pooled_dim": 32, "text_layers": 1,
                 "text_heads": 2}


def _models(request):
    small = ShapesModel.from_config(_SMALL_SHAPES)
    yield "shapes", small, "a red circle"
    for fam in ("sd3", "flux", "wan"):
        path = request.getfixturevalue(f"tiny_{fam}_dir")
        yield fam, load_model(fam, str(path), **TINY_SIZES[fam]), "a red cat"


def test_checkpointing_keeps_less_and_leaves_every_lora_gradient_bitwise_equal(request):
    for fam, model, prompt in _models(request):
        torch.manual_seed(0)
        model.add_lora(init="gaussian")
        for p in model.lora_parameters():  # non-zero B, so every LoRA tensor gets a gradient
            p.data.normal_(0.0, 0.02)
        off, on = measure(model, prompt, batch=2, repeat=1)
        assert off["rows_per_forward"] == on["rows_per_forward"] == (2 if fam == "flux" else 4), fam  # FLUX: no CFG rows
        assert on["grad_max_abs_diff"] == 0.0, fam
        assert 0 < on["saved_bytes"] < off["saved_bytes"] / 2, (fam, off["saved_bytes"], on["saved_bytes"])
        assert not model.transformer.gradient_checkpointing, "measure leaves the model as it found it"


def test_set_gradient_checkpointing_refuses_a_transformer_without_it():
    model = ShapesModel.from_config(_SMALL_SHAPES)
    model.transformer = nn.Linear(2, 2)
    with pytest.raises(UserError, match="does not support gradient checkpointing; set model.gradient_checkpointing=false"):
        model.set_gradient_checkpointing(True)


def _final_lora(run):
    from safetensors.torch import load_file

    from flowalign.models.lora import WEIGHT_NAME

    return load_file(str(run / "checkpoints" / "step-2" / "raw" / WEIGHT_NAME))


def test_a_training_run_with_checkpointing_ends_with_the_same_weights_and_recomputes(tmp_path, monkeypatch):
    import torch.utils.checkpoint as ckpt

    from flowalign.train import train

    calls = []
    real = ckpt.checkpoint

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    train(C.load_config(str(ROOT / "configs" / "shapes_grpo.yaml"), [*SMALL, f"output.run_dir={tmp_path / 'plain'}"]))
    assert not calls
    monkeypatch.setattr(ckpt, "checkpoint", counting)
    train(C.load_config(str(ROOT / "configs" / "shapes_grpo.yaml"),
                        [*SMALL, f"output.run_dir={tmp_path / 'ckpt'}", "model.gradient_checkpointing=true"]))
    assert calls, "the transformer blocks were not checkpointed"
    plain, with_ckpt = _final_lora(tmp_path / "plain"), _final_lora(tmp_path / "ckpt")
    assert plain.keys() == with_ckpt.keys()
    assert all(torch.equal(plain[k], with_ckpt[k]) for k in plain)
    assert any(float(plain[k].abs().max()) > 0 for k in plain if "lora_B" in k), "the run did not train"
    import json

    def nfe(run):  # the forward counts: recomputed blocks are not transformer forwards
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        return [{k: v for k, v in r.items() if k.startswith("nfe/")} for r in rows]

    assert nfe(tmp_path / "plain") == nfe(tmp_path / "ckpt") and any(nfe(tmp_path / "plain"))


def test_the_option_is_in_the_configs_and_the_summary():
    cfg = C.load_config(str(ROOT / "configs" / "flux_pickscore.yaml"), [])
    assert cfg.model.gradient_checkpointing is True
    assert C.load_config(str(ROOT / "configs" / "wan21_hps.yaml"), []).model.gradient_checkpointing is True
    assert "gradient checkpointing" in C.summary(cfg)
    with pytest.raises(UserError, match="model.gradient_checkpointing"):
        C.load_config(str(ROOT / "configs" / "shapes_grpo.yaml"), ["model.gradient_checkpointing=maybe"])


@pytest.mark.parametrize("argv, needle", [
    (["--models", "sd35"], "unknown or no model"),
    (["--models", "sd3,flux", "--path", "."], "pass a single --models"),
    (["--models", "sd3", "--path", "/no/such/dir"], "is not a directory"),
    (["--batch", "0"], "must be >= 1"),
])
def test_bench_train_memory_refuses_bad_input_in_one_line(capsys, argv, needle):
    _fails(capsys, ["bench", "train-memory", *argv], needle)


def test_bench_train_memory_prints_both_modes(capsys, tmp_path):
    from flowalign.cli import main

    assert main(["bench", "train-memory", "--models", "shapes", "--batch", "1", "--repeat", "1", "--threads", "1",
                 "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "less with checkpointing" in out
    import json

    rows = json.loads((tmp_path / "m.json").read_text())["models"][0]["rows"]
    assert [r["checkpointing"] for r in rows] == [False, True]
    assert rows[1]["saved_bytes"] < rows[0]["saved_bytes"] and rows[1]["grad_max_abs_diff"] == 0.0


@pytest.mark.parametrize("family", ["sd3", "flux", "wan"])
def test_counting_on_the_meta_device_equals_a_real_cpu_forward(request, family):
    """The bench counts published architectures on the meta device (no weights); for the tiny pipelines' configs the
    count is the same, to the byte, as that of the same forward on real CPU tensors, without and with checkpointing
    (the CPU's fused attention keeps q, k, v, its output laid out [B, L, H, D] and the log-sum-exp, as the stand-in)."""
    import json

    from flowalign.bench_memory import count_config

    path = request.getfixturevalue(f"tiny_{family}_dir")
    cfg = {k: v for k, v in json.loads((path / "transformer" / "config.json").read_text()).items()
           if not k.startswith("_")}
    cpu = count_config(family, cfg, 2, 64, 64, dtype=torch.float32, device="cpu")
    meta = count_config(family, cfg, 2, 64, 64, dtype=torch.float32, device="meta")
    assert (meta["saved_bytes_off"], meta["saved_bytes_on"]) == (cpu["saved_bytes_off"], cpu["saved_bytes_on"])
    assert 0 < cpu["saved_bytes_on"] < cpu["saved_bytes_off"] / 4
    assert cpu["rows"] == (2 if family == "flux" else 4)  # FLUX is guidance-distilled: no second CFG branch


def test_published_architecture_counts_and_keeps_fp32_modules():
    import diffusers

    from flowalign.bench_memory import count_architecture
    from flowalign.models import wan
    from flowalign.models.base import build_transformer

    from flowalign.bench_memory import architectures

    assert architectures() == {"sd3.5-medium": "sd3", "sd3.5-large": "sd3", "flux.1-dev": "flux",
                               "flux.1-schnell": "flux", "wan2.1-1.3b": "wan", "wan2.1-14b": "wan"}
    r = count_architecture("sd3.5-medium", 1, 256, 256)
    assert r["rows"] == 2 and r["saved_bytes_off"] > 10 * r["saved_bytes_on"] > 0
    tr = build_transformer(getattr(diffusers, wan.TRANSFORMER), wan.ARCHITECTURES["wan2.1-1.3b"], torch.bfloat16)
    dtypes = {n: p.dtype for n, p in tr.named_parameters()}
    assert dtypes["blocks.0.scale_shift_table"] == torch.float32  # Wan's _keep_in_fp32_modules, as from_pretrained
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert 1.3e9 < sum(p.numel() for p in tr.parameters()) < 1.5e9


@pytest.mark.parametrize("argv, needle", [
    (["--arch", "sd4"], "unknown or no architecture"),
    (["--arch", "wan2.1-1.3b", "--frames", "8"], "4k + 1 frames"),
    (["--arch", "sd3.5-medium", "--resolution", "500"], "multiple of 16"),
])
def test_bench_train_memory_arch_refuses_bad_input_in_one_line(capsys, argv, needle):
    _fails(capsys, ["bench", "train-memory", *argv], needle)


def test_preflight_estimates_the_update_from_the_loaded_model_and_warns_when_it_will_not_fit(tiny_sd3_dir, caplog):
    """A GPU run checks, before its first rollout, what an update micro-batch will keep for the backward (counted on
    the meta device from the loaded transformer's config) against the free memory, and names both fixes."""
    import logging

    from flowalign.bench_memory import count_config, preflight

    model = load_model("sd3", str(tiny_sd3_dir), **TINY_SIZES["sd3"])
    model.add_lora(4, 8)
    spec = (model.lora_targets, 4, 8)
    with caplog.at_level(logging.INFO, logger="flowalign.bench_memory"):
        est = preflight(model, "sd3", 8, checkpointing=False, lora=spec, free_bytes=2**40)
    cfg = {k: v for k, v in dict(model.transformer.config).items() if not k.startswith("_")}
    ref = count_config("sd3", cfg, 8, model.height, model.width, dtype=model.dtype, lora=spec,
                       max_sequence_length=model.max_sequence_length)
    assert (est["saved_bytes_off"], est["saved_bytes_on"]) == (ref["saved_bytes_off"], ref["saved_bytes_on"])
    n_lora = sum(p.numel() for p in model.lora_parameters())
    assert est["needed_bytes"] == est["saved_bytes_off"] + 12 * n_lora
    assert "memory: an update micro-batch of 8 keeps" in caplog.text and "WARNING" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flowalign.bench_memory"):
        preflight(model, "sd3", 8, checkpointing=False, lora=spec, free_bytes=est["needed_bytes"] // 2)
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and "model.gradient_checkpointing=true" in warn[0] and "train.micro_batch" in warn[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flowalign.bench_memory"):  # with checkpointing on, it fits
        preflight(model, "sd3", 8, checkpointing=True, lora=spec, free_bytes=est["needed_bytes"] // 2)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert preflight(ShapesModel.from_config(_SMALL_SHAPES), "shapes", 8, checkpointing=False,
                     lora=((), 8, 16), free_bytes=1) is None  # no step_inputs: nothing to count


@pytest.mark.parametrize("family", ["sd3", "flux", "wan"])
def test_preflight_counts_the_rows_velocity_runs(request, family):
    """SD3 and Wan run both CFG branches only when guidance_scale > 1; preflight counted 2 rows per prompt at any scale,
    doubling the estimate of a no-CFG run. FLUX (guidance-distilled) runs one row per prompt at any scale."""
    from flowalign.bench_memory import preflight

    model = load_model(family, str(request.getfixturevalue(f"tiny_{family}_dir")), max_sequence_length=16,
                       **TINY_SIZES[family])
    fed: list[int] = []
    hook = model.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: fed.append(int(kwargs["hidden_states"].shape[0])), with_kwargs=True)
    cond = model.encode(["a red cat"] * 3)
    seen = {}
    try:
        for w in (1.0, 0.5, 4.5):
            model.guidance_scale = w
            fed.clear()
            with torch.no_grad():
                model.velocity(model.init_noise(3), torch.tensor(0.5), cond)
            est = preflight(model, family, 3, checkpointing=False, lora=(model.lora_targets, 4, 8), free_bytes=2**40)
            assert fed == [est["rows"]], (w, fed, est["rows"])
            seen[w] = est
    finally:
        hook.remove()
    assert seen[1.0]["rows"] == 3 and seen[4.5]["rows"] == (3 if family == "flux" else 6)
    if family != "flux":  # half the rows keep less for the backward
        assert seen[1.0]["saved_bytes_off"] < seen[4.5]["saved_bytes_off"]
