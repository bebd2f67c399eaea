"""A model path the sd3/flux/wan (or shapes) loader cannot load gets one line that says what the path is and what to
pass: a training run, a LoRA, a pipeline's component folder or one of its files, a model of another family, a hub id
that is not in the local cache (offline). Was: diffusers' own words ("no weights file (model_index.safetensors or
.bin) in runs/sd3", "... is neither a valid local path nor a valid repo id") or an inner error cut at 200 characters
mid-word with its parentheses left open."""

from __future__ import annotations

import pytest
import torch
import yaml
from cli_checks import fails
from safetensors.torch import save_file

from flowalign.errors import UserError
from flowalign.models import load_model
from flowalign.models.lora import WEIGHT_NAME
from flowalign.models.shapes import ShapesModel

SHAPES = dict(vocab=["a", "red", "circle"], image_size=16, patch_size=4, num_layers=1, num_heads=2, head_dim=8,
              text_dim=16, text_layers=1, text_heads=2, max_len=6, pooled_dim=16)


@pytest.fixture
def pipelines(tiny_sd3_dir, tiny_flux_dir, tiny_wan_dir):
    return {"sd3": tiny_sd3_dir, "flux": tiny_flux_dir, "wan": tiny_wan_dir}


def _error(fn) -> str:
    with pytest.raises(UserError) as info:
        fn()
    text = str(info.value)
    assert "\n" not in text, text
    assert text.count("(") == text.count(")"), text
    return text


def _train_run(root, family: str, base) -> tuple:
    """A `flowalign train` run as it lies on disk: config.yaml naming its base model, checkpoints/step-N/ with LoRAs."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"model": {"name": family, "path": str(base)}}))
    for n in (2, 10):
        ckpt = root / "checkpoints" / f"step-{n}"
        ckpt.mkdir(parents=True)
        save_file({"transformer.x.lora_A.weight": torch.zeros(2, 2)}, str(ckpt / WEIGHT_NAME))
    return root, root / "checkpoints" / "step-10"


@pytest.mark.parametrize("family", ["sd3", "flux", "wan"])
def test_a_training_run_or_its_lora_as_path_says_to_pass_the_lora_with_the_base_model(family, pipelines, tmp_path):
    """Was: "cannot load the sd3 pipeline from 'runs/sd3' (no weights file (model_index.safetensors or .bin) in
    runs/sd3); pass a local diffusers directory", for a run and for its checkpoint alike."""
    run, ckpt = _train_run(tmp_path / "run", family, pipelines[family])
    base = f"--model {family} --path {str(pipelines[family])!r}"
    for given in (run, run / "checkpoints"):
        text = _error(lambda: load_model(family, str(given)))
        assert f"no {family} pipeline at {str(given)!r}" in text, text
        assert "is a `flowalign train` run" in text and f"pass --lora {str(ckpt)!r}" in text, text
        assert base in text and "model_index.safetensors" not in text, text
    for given in (ckpt, ckpt / "raw"):
        if given.name == "raw":
            given.mkdir()
            (given / WEIGHT_NAME).write_bytes((ckpt / WEIGHT_NAME).read_bytes())
        text = _error(lambda: load_model(family, str(given)))
        assert f"holds a LoRA, not a model ({WEIGHT_NAME}); pass it as --lora {str(given)!r}" in text, text
        assert base in text, text


@pytest.mark.parametrize("family", ["sd3", "flux", "wan"])
def test_a_component_folder_or_a_single_file_names_the_pipeline_directory(family, pipelines):
    """Was: "no weights file (model_index.safetensors or .bin) in …/transformer" for the transformer/ folder and
    "… is neither a valid local path nor a valid repo id" for a weights file."""
    pipe = pipelines[family]
    text = _error(lambda: load_model(family, str(pipe / "transformer")))
    assert f"is the transformer/ folder of the pipeline at {str(pipe)!r}; pass its parent" in text, text
    weights = next((pipe / "transformer").glob("*.safetensors"))
    text = _error(lambda: load_model(family, str(weights)))
    assert "is a single file; pass the pipeline directory (with model_index.json)" in text, text
    assert f"did you mean {str(pipe)!r}?" in text and "valid repo id" not in text, text


def test_a_single_file_of_no_pipeline_says_only_directories_load(tmp_path):
    lone = tmp_path / "sd3.5_medium.safetensors"
    save_file({"x": torch.zeros(1)}, str(lone))
    text = _error(lambda: load_model("sd3", str(lone)))
    assert "is a single file; pass the pipeline directory (with model_index.json)" in text, text
    assert "not single-file checkpoints" in text, text


def test_a_pipeline_or_its_file_given_to_shapes_names_its_family(pipelines):
    """Was: "no shapes model at '…/sd3' (expected config.json and model.safetensors there); use '' for the shipped
    model or a directory written by `flowalign pretrain` (its final/)"."""
    for family, pipe in pipelines.items():
        text = _error(lambda: ShapesModel.from_pretrained(str(pipe)))
        assert f"no shapes model at {str(pipe)!r}" in text, text
        assert f"pass --model {family} --path {str(pipe)!r}" in text, text
    text = _error(lambda: ShapesModel.from_pretrained(str(pipelines["flux"] / "model_index.json")))
    assert "is a single file" in text and "holds a FluxPipeline; pass --model flux" in text, text


def test_a_shapes_model_given_to_a_diffusers_family_names_shapes(tmp_path):
    torch.manual_seed(0)
    ShapesModel.from_config(dict(SHAPES)).save_pretrained(tmp_path / "pre" / "final")
    for given in (tmp_path / "pre" / "final", tmp_path / "pre"):
        text = _error(lambda: load_model("sd3", str(given)))
        assert f"holds a shapes model (flowalign's built-in); pass --model shapes --path " \
               f"{str(tmp_path / 'pre' / 'final')!r}" in text, text


def test_an_uncached_hub_id_says_it_is_not_cached_and_how_to_get_it():
    """Was: "… (Cannot load model …: the model is not fully cached locally (Cannot find an appropriate cached
    snapshot folder for the specified revision on the local disk and out); pass a local diffusers directory" (cut
    mid-word)."""
    hub_id = "flowalign-tests/no-such-pipeline"
    text = _error(lambda: load_model("sd3", hub_id, local_files_only=True))
    assert f"{hub_id!r} is not a local directory, and as a Hugging Face hub id it is not (fully) in the local cache"\
        in text, text
    assert "local_files_only is set" in text, text
    assert f"hf download {hub_id} --local-dir DIR) and pass --path DIR" in text, text
    text = _error(lambda: load_model("flux", hub_id, revision="v2"))  # the tests run with HF_HUB_OFFLINE=1
    assert "offline mode is on (HF_HUB_OFFLINE)" in text and f"hf download {hub_id} --revision v2" in text, text


def test_a_missing_local_directory_says_there_is_none(tmp_path):
    text = _error(lambda: load_model("wan", str(tmp_path / "nowhere")))
    assert f"there is no directory {str(tmp_path / 'nowhere')!r}" in text and "valid repo id" not in text, text


def test_a_long_inner_error_is_cut_at_a_boundary_with_its_parentheses_closed():
    from flowalign.models.base import _clip

    inner = ("Cannot load model x/y: the model is not fully cached locally (Cannot find an appropriate cached snapshot "
             "folder for the specified revision on the local disk and outgoing traffic has been disabled [see docs].)")
    cut = _clip(inner, limit=140)
    kept = cut[: -len(" …)")]
    assert cut.endswith(" …)") and len(kept) <= 140 and inner.startswith(kept + " "), cut  # whole words, ( closed
    sentence = "First sentence says what went wrong (here). " + "Then a long explanation " * 20
    assert _clip(sentence, limit=120) == "First sentence says what went wrong (here)."
    assert _clip("short (kept whole)") == "short (kept whole)"


def test_sample_with_a_training_run_as_path_is_one_line_exit_2(pipelines, tmp_path, capsys):
    run, ckpt = _train_run(tmp_path / "run", "sd3", pipelines["sd3"])
    fails(capsys, ["sample", "a cat", "--model", "sd3", "--path", str(run), "--out", str(tmp_path / "g.png")],
          "is a `flowalign train` run", f"pass --lora {str(ckpt)!r}")
