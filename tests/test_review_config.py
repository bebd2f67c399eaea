"""Review of flowalign.config: seeds the trainer cannot use, YAML merge keys, parser/coercion tracebacks, silent
no-op removals in dotted overrides, and int fields that round a float silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowalign.config import ExperimentConfig, load_config

from test_config import _err  # noqa: E402  (raises UserError, asserts one line, returns the message)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- 1. train.seed beyond what torch.manual_seed takes passed the config and crashed deep in train() -------------


@pytest.mark.parametrize("seed", [2**64, 2**64 - 2, 10**30, -(2**63) - 1])
def test_seed_that_torch_cannot_take_is_refused_at_load(seed):
    # 2**64: torch.manual_seed(cfg.train.seed) in train() (phase 1) raises "Overflow when unpacking long long";
    # 2**64 - 2 passes that call but sample_grid seeds image j with seed + j, so the base-eval grid crashes after
    # the run directory was created (and, with output.overwrite=true, after the earlier run was deleted)
    msg = _err(load_config, None, [f"train.seed={seed}"])
    assert "train.seed" in msg


def test_torch_really_refuses_those_seeds():
    torch = pytest.importorskip("torch")
    with pytest.raises((ValueError, RuntimeError)):
        torch.Generator().manual_seed(2**64)


@pytest.mark.parametrize("seed", [0, 42, -1, 2**32, 2**63 - 1, -(2**63)])
def test_ordinary_and_negative_seeds_still_load(seed):
    assert load_config(None, [f"train.seed={seed}"]).train.seed == seed


# -- 2. YAML merge keys (<<: *anchor) were refused as "malformed YAML" by the duplicate-key loader -----------------


def test_yaml_merge_keys_load(tmp_path):
    p = _write(tmp_path / "x.yaml", (
        "reward:\n"
        "  kwargs:\n"
        "    pickscore: &shared {path: /w/pickscore, device: cpu}\n"
        "    hps:\n"
        "      <<: *shared\n"
        "      path: /w/hps\n"
    ))
    cfg = load_config(p)
    assert cfg.reward.kwargs == {"pickscore": {"path": "/w/pickscore", "device": "cpu"},
                                 "hps": {"path": "/w/hps", "device": "cpu"}}


def test_duplicate_keys_are_still_refused_next_to_a_merge_key(tmp_path):
    p = _write(tmp_path / "x.yaml", (
        "reward:\n"
        "  kwargs:\n"
        "    pickscore: &shared {path: /w/pickscore}\n"
        "    hps:\n"
        "      <<: *shared\n"
        "      path: /w/a\n"
        "      path: /w/b\n"
    ))
    assert "duplicate key 'path'" in _err(load_config, p)


# -- 3. parser/coercion errors that are not YAMLError escaped as tracebacks ---------------------------------------


@pytest.mark.parametrize("override, key", [
    ("train.ema=!!bool maybe", "train.ema"),          # KeyError inside PyYAML's bool constructor
    ("train.lr=!!float abc", "train.lr"),             # ValueError inside PyYAML's float constructor
    ("train.iterations=!!int abc", "train.iterations"),
    ("train.lr=1" + "0" * 400, "train.lr"),            # float(int) OverflowError in the coercion
    ("reward.weights.shapes_partial=1" + "0" * 400, "reward.weights.shapes_partial"),
    ("train.seed=1" + "0" * 5000, "train.seed"),       # ValueError: int string conversion limit, inside PyYAML
])
def test_bad_override_values_are_one_line_errors(override, key):
    assert key in _err(load_config, None, [override])


def test_bad_tag_in_a_file_is_a_one_line_error(tmp_path):
    p = _write(tmp_path / "x.yaml", "train:\n  lr: !!float abc\n")
    msg = _err(load_config, p)
    assert "x.yaml" in msg


# -- 4. '=null' on a mapping key that is not there (a typo) was silently ignored ---------------------------------


def test_removing_a_missing_mapping_key_is_refused():
    msg = _err(load_config, None, ["reward.weights={pickscore: 1.0, shapes_partial: 1.0}",
                                   "reward.weights.pickscroe=null"])
    assert "reward.weights.pickscroe" in msg and "'pickscore'" in msg
    assert "credit.options.probe" in _err(load_config, None, ["credit.options.probe=null"])
    # removing a key that is there still works, nested too
    cfg = load_config(None, ["reward.weights={pickscore: 1.0, shapes_partial: 1.0}", "reward.weights.pickscore=null",
                             "reward.kwargs.pickscore.path=/w", "reward.kwargs.pickscore.path=null"])
    assert cfg.reward.weights == {"shapes_partial": 1.0} and cfg.reward.kwargs == {"pickscore": {}}


# -- 5. int fields rounded a float beyond 2**53 silently ---------------------------------------------------------


def test_int_field_refuses_a_float_it_cannot_hold_exactly():
    # 9007199254740993.0 parses as the float 9007199254740992.0: the run would use another seed than the one typed
    assert "train.seed" in _err(load_config, None, ["train.seed=9007199254740993.0"])
    assert "train.iterations" in _err(load_config, None, ["train.iterations=1e30"])
    # ordinary float spellings of ints still coerce
    cfg = load_config(None, ["train.iterations=1e3", "train.seed=2.0e+3", "train.group_size=4.0"])
    assert (cfg.train.iterations, cfg.train.seed, cfg.train.group_size) == (1000, 2000, 4)
    assert load_config(None, ["train.seed=9007199254740993"]).train.seed == 9007199254740993  # as an int: exact
    assert ExperimentConfig().train.seed == 42
