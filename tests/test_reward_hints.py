"""Where a learned reward's weights or tokenizer come from, and what the one-line error says when they are missing.

* A bare hub id (``bert-base-uncased``, ImageReward's default tokenizer) is looked up in the local Hugging Face cache,
  like ``owner/name``; it was refused as a missing path, so ImageReward's default tokenizer could never load.
* Every not-cached hint names the reward as it was asked for (``hpsv21``, not ``hps``) and the setting in both forms
  (``reward.kwargs.NAME.ARG=...`` for a train config, ``--reward-arg NAME.ARG=...`` for eval/steer).
* A tokenizer's or processor's ``hf download`` fetches only ``*.json``/``*.txt``, not the multi-GB weights.
* ``configs/wan21_hps.yaml`` shows the tokenizer setting an offline run needs.
"""

from __future__ import annotations

import inspect
import re
import shutil
from pathlib import Path

import pytest

from flowalign.errors import UserError
from flowalign.rewards import build_reward, resolve
from tiny_rewards import (  # noqa: F401  (session fixtures)
    bert_tokenizer,
    build_tiny_hps_file,
    tiny_clip_dir,
    tiny_hps_files,
    tiny_imagereward_files,
)

ROOT = Path(__file__).resolve().parents[1]
ONLY_TOKENIZER = "--include '*.json' '*.txt'"


@pytest.fixture
def hf_cache(monkeypatch, tmp_path):
    """An empty Hugging Face hub cache under ``tmp_path``, downloads off, run from an empty directory (so no local path
    shadows a bare id). huggingface_hub reads ``HF_HUB_CACHE`` at import: its constant is patched too."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache


def cache_snapshot(cache: Path, repo: str) -> Path:
    """The snapshot directory of ``repo`` in the hub cache's layout (models--OWNER--NAME/snapshots/HASH, refs/main)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snap


def error_of(name: str, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        build_reward(name, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------------------------------------------------
# 1. bare hub ids


def test_imagereward_loads_its_default_bare_tokenizer_id_from_the_local_cache(hf_cache, tiny_imagereward_files):
    """`tokenizer_path` defaults to `bert-base-uncased`; with that id cached, ImageReward builds offline (it raised
    "'bert-base-uncased' does not exist" before looking in the cache)."""
    snap = cache_snapshot(hf_cache, "bert-base-uncased")
    bert_tokenizer().save_pretrained(snap)
    (snap / "config.json").write_text('{"model_type": "bert"}')  # the hub repo's config, fetched by --include '*.json'
    r = build_reward("imagereward", path=str(tiny_imagereward_files["path"]), vision_heads=2)
    assert r.tokenizer.get_vocab() == bert_tokenizer().get_vocab()


@pytest.mark.parametrize("source", ["bert-base-uncased", "gpt2", "t5-v1_1", "gpt-neo-1.3B"])
def test_a_bare_name_that_is_no_path_here_is_a_hub_id(hf_cache, source):
    from flowalign.rewards.base import is_hub_id, resolve_source

    assert is_hub_id(source)
    assert resolve_source(source, "test tokenizer") == source


@pytest.mark.parametrize("source", ["./bert", "~/bert", ".bert", "tokenizer.json", "HPS_v2.1_compressed.pt",
                                    "vocab.txt", "weights/bert"])
def test_a_string_that_looks_like_a_path_stays_a_missing_path(hf_cache, source):
    from flowalign.rewards.base import is_hub_id, resolve_source

    (Path.cwd() / "weights").mkdir()  # weights/bert: a missing subdirectory of a directory here
    assert not is_hub_id(source)
    with pytest.raises(UserError, match=f"{re.escape(repr(source))} does not exist"):
        resolve_source(source, "test tokenizer")


def test_an_existing_local_directory_wins_over_the_bare_hub_id(hf_cache, tiny_imagereward_files):
    from flowalign.rewards.base import is_hub_id, resolve_source

    shutil.copytree(tiny_imagereward_files["tokenizer_path"], Path.cwd() / "bert-base-uncased")
    assert not is_hub_id("bert-base-uncased")
    assert resolve_source("bert-base-uncased", "test tokenizer") == "bert-base-uncased"
    r = build_reward("imagereward", path=str(tiny_imagereward_files["path"]), vision_heads=2)  # no cache entry needed
    assert len(r.tokenizer) == len(bert_tokenizer())


def test_a_missing_tokenizer_path_names_the_setting_to_pass(hf_cache, tiny_imagereward_files):
    msg = error_of("imagereward", path=str(tiny_imagereward_files["path"]), vision_heads=2, tokenizer_path="./bert")
    assert msg.startswith("imagereward tokenizer: './bert' does not exist")
    assert "reward.kwargs.imagereward.tokenizer_path=PATH (train config)" in msg
    assert "--reward-arg imagereward.tokenizer_path=PATH" in msg


def test_an_uncached_bare_id_gives_the_download_hint(hf_cache, tiny_imagereward_files):
    msg = error_of("imagereward", path=str(tiny_imagereward_files["path"]), vision_heads=2)
    assert msg.startswith("imagereward tokenizer: checkpoint bert-base-uncased")
    assert "is not in the local Hugging Face cache" in msg
    assert f"`hf download bert-base-uncased {ONLY_TOKENIZER} --local-dir DIR`" in msg
    assert "reward.kwargs.imagereward.tokenizer_path=DIR (train config)" in msg
    assert "--reward-arg imagereward.tokenizer_path=DIR" in msg
    # a bare name the user meant as a directory: the hint says it was read as a hub id because no such path exists
    msg = error_of("imagereward", path=str(tiny_imagereward_files["path"]), vision_heads=2, tokenizer_path="mybert")
    assert "mybert (a hub id: no local path of that name here)" in msg


# --------------------------------------------------------------------------------------------------------------------
# 2. + 3. hints name the reward, both setting forms, and download only a tokenizer's files


def test_hpsv21_tokenizer_hint_names_hpsv21_both_forms_and_only_the_tokenizer_files(hf_cache, tiny_hps_files,
                                                                                     tmp_path):
    v21 = build_tiny_hps_file(tmp_path / "hps", seed=1, name="HPS_v2.1_compressed.pt")
    msg = error_of("hpsv21", checkpoint=str(v21), arch=tiny_hps_files["arch"])
    assert msg.startswith("hpsv21 tokenizer: checkpoint laion/CLIP-ViT-H-14-laion2B-s32B-b79K is not in the local")
    assert "reward.kwargs.hpsv21.tokenizer=DIR (train config)" in msg
    assert "--reward-arg hpsv21.tokenizer=DIR" in msg
    assert f"`hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K {ONLY_TOKENIZER} --local-dir DIR`" in msg
    msg = error_of("hps", checkpoint=str(tiny_hps_files["checkpoint"]), arch=tiny_hps_files["arch"])
    assert msg.startswith("hps tokenizer:") and "reward.kwargs.hps.tokenizer=DIR" in msg


@pytest.mark.parametrize("name, arg, filename", [("hpsv21", "checkpoint", "HPS_v2.1_compressed.pt"),
                                                 ("hps", "checkpoint", "HPS_v2_compressed.pt"),
                                                 ("imagereward", "path", "ImageReward.pt")])
def test_checkpoint_file_hints_name_the_reward_and_both_forms(hf_cache, name, arg, filename):
    """The file-download path (``hub_file``) said `pass checkpoint=DIR/...`, with no reward and no config form."""
    msg = error_of(name)
    assert msg.startswith(f"{name}: checkpoint file {filename!r}")
    assert f"reward.kwargs.{name}.{arg}=DIR/{filename} (train config)" in msg
    assert f"--reward-arg {name}.{arg}=DIR/{filename}" in msg
    assert "--include" not in msg  # one named file: nothing to filter


def test_a_directory_without_the_file_names_the_setting(hf_cache, tiny_hps_files):
    (Path.cwd() / "empty").mkdir()
    tok = str(tiny_hps_files["tokenizer"])
    msg = error_of("hpsv21", checkpoint="empty", arch=tiny_hps_files["arch"], tokenizer=tok)
    assert "'empty' holds no 'HPS_v2.1_compressed.pt'" in msg and "reward.kwargs.hpsv21.checkpoint=PATH" in msg


def test_pickscore_processor_hint_downloads_only_the_processor_files(hf_cache, tiny_clip_dir):
    """A PickScore model directory without a processor falls back to the laion processor id: its hint fetches only
    the processor's json/txt files (docs/rewards.md's command), not the ViT-H/14 weights."""
    model_only = Path.cwd() / "pickscore-model"
    model_only.mkdir()
    for f in tiny_clip_dir.iterdir():
        if f.name == "config.json" or f.suffix in (".safetensors", ".bin"):
            shutil.copy(f, model_only / f.name)
    msg = error_of("pickscore", path=str(model_only))
    assert msg.startswith("pickscore processor: checkpoint laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    assert f"`hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K {ONLY_TOKENIZER} --local-dir DIR`" in msg
    assert "reward.kwargs.pickscore.processor_path=DIR" in msg and "--reward-arg pickscore.processor_path=DIR" in msg


def test_the_hint_command_matches_the_catalogue_and_the_docs():
    """A tokenizer hint's command is the one `flowalign rewards` (Checkpoint.obtain) and docs/rewards.md give."""
    from flowalign.rewards.base import TOKENIZER_FILES, hub_hint

    docs = (ROOT / "docs" / "rewards.md").read_text()
    for name in ("hpsv21", "imagereward"):
        ckpt = [c for c in resolve(name).checkpoints if "tokenizer" in c.arg][0]
        hint = hub_hint(ckpt.default, f"{name} tokenizer", ckpt.arg, reward=name, include=TOKENIZER_FILES)
        command = re.search(r"`(hf download [^`]*)`", hint).group(1)
        assert command in ckpt.obtain
        assert command.replace("DIR", "") in re.sub(r"--local-dir \S+", "--local-dir ", docs)


# --------------------------------------------------------------------------------------------------------------------
# 4. the Wan + HPS config says how to pass the tokenizer


def test_wan21_hps_config_header_shows_the_tokenizer_setting():
    header = [line[1:].strip() for line in (ROOT / "configs" / "wan21_hps.yaml").read_text().splitlines()
              if line.startswith("#")]
    text = " ".join(header)
    settings = dict(re.findall(r"reward\.kwargs\.hpsv21\.(\w+)=(\S+)", text))
    assert {"checkpoint", "tokenizer"} <= set(settings)
    assert set(settings) <= set(inspect.signature(resolve("hpsv21")).parameters)  # real keyword names
    assert f"hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K {ONLY_TOKENIZER} --local-dir {settings['tokenizer']}" \
        in re.sub(r"\s+", " ", text)
