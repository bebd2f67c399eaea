"""Errors that name what the user probably meant when a model or LoRA directory is not what the command needs: a run
directory instead of its final/ or checkpoint, a model of the other shapes family, a LoRA of another model (named from
its metadata or its training run's config.yaml), with its target list cut at whole names."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from cli_checks import fails
from safetensors import safe_open

from flowalign.errors import UserError
from flowalign.models import lora as L
from flowalign.models.shapes import ShapesModel, _asset_dir
from flowalign.models.shapes_video import ShapesVideoModel

IMAGE = dict(vocab=["a", "red", "blue", "circle", "square"], image_size=16, patch_size=4, num_layers=2, num_heads=2,
             head_dim=8, text_dim=16, text_layers=1, text_heads=2, max_len=6, pooled_dim=16)
VIDEO = {"frames": 4, "image_size": 16, "patch_size": 4, "num_layers": 1, "num_heads": 2, "head_dim": 12,
         "ffn_dim": 32, "freq_dim": 16, "text_dim": 24, "text_layers": 1, "text_heads": 2, "pooled_dim": 8}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny image and video model (as `flowalign pretrain` writes final/) and a LoRA of the video model."""
    root = tmp_path_factory.mktemp("hints")
    torch.manual_seed(0)
    image, video = ShapesModel.from_config(dict(IMAGE)), ShapesVideoModel.from_config(dict(VIDEO))
    image.save_pretrained(root / "img" / "final")
    video.save_pretrained(root / "vid" / "final")
    video.add_lora(rank=2, alpha=2)
    video.save_lora(root / "vlora")
    return root


def _raises(fn, *needles):
    with pytest.raises(UserError) as info:
        fn()
    text = str(info.value)
    assert "\n" not in text
    for n in needles:
        assert n in text, text
    return text


# ---------------------------------------------------------------------------------------- run dirs as --path


@pytest.mark.parametrize("family, run", [(ShapesModel, "img"), (ShapesVideoModel, "vid")])
def test_a_pretrain_run_directory_names_its_final_model(dirs, family, run):
    """Was: "no shapes model at 'pre2' ...; use '' ... or a directory written by `flowalign pretrain`" for the very
    directory pretrain wrote (the model is in its final/)."""
    _raises(lambda: family.from_pretrained(str(dirs / run)), f"no {family.ASSET} model at",
            f"did you mean {str(dirs / run / 'final')!r}?")


def test_a_run_without_final_names_its_newest_model_checkpoint_or_says_it_is_unfinished(dirs, tmp_path):
    model = ShapesModel.from_pretrained(str(dirs / "img" / "final"))
    for n in (2, 10):  # numerically newest: step-10, not step-2
        model.save_pretrained(tmp_path / "run" / "checkpoints" / f"step-{n}")
    _raises(lambda: ShapesModel.from_pretrained(str(tmp_path / "run")),
            f"did you mean {str(tmp_path / 'run' / 'checkpoints' / 'step-10')!r}?")
    state = tmp_path / "pre" / "checkpoints" / "step-3"  # a pretraining checkpoint: training state only
    state.mkdir(parents=True)
    (state / "state.pt").write_bytes(b"")
    _raises(lambda: ShapesModel.from_pretrained(str(tmp_path / "pre")), "unfinished `flowalign pretrain` run",
            f"flowalign pretrain --out {tmp_path / 'pre'} --resume")


def test_a_training_run_or_lora_as_path_points_to_lora(dirs, tmp_path):
    ckpt = tmp_path / "tr" / "checkpoints" / "step-2"
    ckpt.mkdir(parents=True)
    (ckpt / L.WEIGHT_NAME).write_bytes((dirs / "vlora" / L.WEIGHT_NAME).read_bytes())
    _raises(lambda: ShapesVideoModel.from_pretrained(str(tmp_path / "tr")), "is a `flowalign train` run",
            f"pass --lora {str(ckpt)!r}")
    _raises(lambda: ShapesVideoModel.from_pretrained(str(ckpt)), "holds a LoRA, not a model",
            f"pass it as --lora {str(ckpt)!r}")


# ---------------------------------------------------------------------------------------- the other family


def test_a_model_of_the_other_shapes_family_names_it(dirs):
    """Was: "unknown shapes model config key(s) ['ffn_dim', 'frames', …]" (video weights as shapes) and "… do not
    match the config (transformer: missing ['scale_shift_table', …])" (image weights as shapes_video)."""
    vid, img = str(dirs / "vid" / "final"), str(dirs / "img" / "final")
    _raises(lambda: ShapesModel.from_pretrained(vid), f"{vid!r} holds a shapes_video model; pass --model shapes_video")
    _raises(lambda: ShapesVideoModel.from_pretrained(img), f"{img!r} holds a shapes model; pass --model shapes")
    shipped = str(_asset_dir("shapes_video"))
    _raises(lambda: ShapesModel.from_pretrained(shipped), "holds a shapes_video model")  # the shipped video model
    assert ShapesVideoModel.from_pretrained(vid).config.frames == 4  # the right family still loads
    # the run directory of the other family's pretraining: both corrections in one line
    _raises(lambda: ShapesModel.from_pretrained(str(dirs / "vid")),
            f"did you mean --model shapes_video --path {vid!r}?")


def test_a_config_that_is_not_json_is_one_line(dirs, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes((dirs / "img" / "final" / "model.safetensors").read_bytes())
    (d / "config.json").write_text("{not json")
    _raises(lambda: ShapesModel.from_pretrained(str(d)), "cannot read", "config.json")


# ---------------------------------------------------------------------------------------- --lora hints


def test_lora_dir_hint_names_the_newest_checkpoint_of_a_training_run(dirs, tmp_path):
    """For sample's `--lora RUN`: was "pass a checkpoint directory, e.g. runs/NAME/checkpoints/step-N"."""
    for n in (2, 10):
        d = tmp_path / "tr" / "checkpoints" / f"step-{n}"
        d.mkdir(parents=True)
        (d / L.WEIGHT_NAME).write_bytes(b"x")
    (tmp_path / "tr" / "checkpoints" / "step-11").mkdir()  # no LoRA file (e.g. an interrupted write)
    newest = str(tmp_path / "tr" / "checkpoints" / "step-10")
    assert L.lora_dir_hint(tmp_path / "tr") == f"did you mean {newest!r}, the newest checkpoint of that " \
                                               "`flowalign train` run?"
    assert newest in L.lora_dir_hint(tmp_path / "tr" / "checkpoints")
    assert "pass it as --path" in L.lora_dir_hint(dirs / "img")  # a pretrain run: its final/ is a model
    assert L.lora_dir_hint(tmp_path / "nowhere") is None


def test_sample_lora_of_a_run_directory_names_its_newest_checkpoint(tmp_path, capsys):
    """`sample --lora RUN` (every command's check_lora_dir) now says which checkpoint to pass."""
    from cli_checks import fails

    for n in (2, 10):
        d = tmp_path / "tr" / "checkpoints" / f"step-{n}"
        d.mkdir(parents=True)
        (d / L.WEIGHT_NAME).write_bytes(b"x")
    fails(capsys, ["sample", "a red circle", "--lora", str(tmp_path / "tr"), "--out", str(tmp_path / "g.png")],
          f"did you mean {str(tmp_path / 'tr' / 'checkpoints' / 'step-10')!r}")


# ---------------------------------------------------------------------------------------- LoRA of another model


def test_short_list_cuts_at_whole_items():
    names = [f"blocks.{i}.attn1.to_out.0" for i in range(20)]
    text = L.short_list(names, 60)
    assert text == repr(names[:2]) + " (+18 more)"
    assert L.short_list(names[:1], 5) == repr(names[:1])  # always at least one
    assert L.short_list(["a", "b"]) == "['a', 'b']"


def test_save_lora_records_the_model_family(dirs):
    with safe_open(str(dirs / "vlora" / L.WEIGHT_NAME), framework="pt", device="cpu") as f:
        assert f.metadata()[L.FAMILY_KEY] == "shapes_video"
    assert L.lora_origin(dirs / "vlora") == "shapes_video"


def _target_error(text: str) -> None:
    """The target list is whole quoted names, then '(+N more)'."""
    m = re.search(r"LoRA target\(s\) (\[.*?\]) \(\+(\d+) more\)", text)
    assert m, text
    assert all(re.fullmatch(r"'[\w.]+'", s.strip()) for s in m.group(1)[1:-1].split(","))


def test_a_lora_of_the_other_family_is_named_and_its_targets_cut_at_whole_names(dirs):
    """Was: "… matches the LoRA target(s) ['blocks.0.attn1.to_k', … 'blocks.1.attn1.to_out); pass a LoRA …": cut by
    the command's 300-character limit in the middle of a name, without saying whose LoRA it is."""
    model = ShapesModel.from_pretrained(str(dirs / "img" / "final"))
    with pytest.raises(ValueError) as info:
        model.load_lora(dirs / "vlora")
    text = str(info.value)
    _target_error(text)
    assert text.endswith(": a LoRA of shapes_video") and len(text) < 300, text


def test_a_lora_without_the_family_is_named_from_its_training_run(dirs, tmp_path):
    """Checkpoints of runs before the metadata existed: the run's config.yaml says which model it trained."""
    run = tmp_path / "tr"
    ckpt = run / "checkpoints" / "step-1"
    video = ShapesVideoModel.from_config(dict(VIDEO))
    video.add_lora(rank=2, alpha=2)
    L.save_lora(video.transformer, ckpt)  # no family in the file
    L.save_lora(video.transformer, ckpt / "raw")
    assert L.lora_origin(ckpt) is None
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "shapes_video", "path": "pt1/final"}}))
    assert L.lora_origin(ckpt) == L.lora_origin(ckpt / "raw") == "shapes_video with --path 'pt1/final'"
    model = ShapesModel.from_pretrained(str(dirs / "img" / "final"))
    with pytest.raises(ValueError, match=r"\(\+\d+ more\): a LoRA of shapes_video with --path 'pt1/final'$"):
        model.load_lora(ckpt)


def test_sample_with_a_lora_of_the_other_family_says_whose_it_is(dirs, tmp_path, capsys):
    out = tmp_path / "g.png"
    err = fails(capsys, ["sample", "a red circle", "--path", str(dirs / "img" / "final"), "--lora",
                         str(dirs / "vlora"), "--steps", "1", "--seeds", "1", "--out", str(out)],
                ": a LoRA of shapes_video); pass a LoRA trained on the same --model/--path")
    _target_error(err)
    assert not out.exists()
