"""flowalign.config: schema, YAML merge, dotted overrides, strict coercion, derived quantities."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from flowalign.config import (
    ExperimentConfig,
    apply_overrides,
    derived,
    describe,
    dump_yaml,
    from_dict,
    load_config,
    summary,
    to_dict,
    trained_steps,
)
from flowalign.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.yaml"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _err(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, f"UserError must be one line: {msg!r}"
    return msg


def test_defaults_load_and_are_frozen():
    cfg = load_config(None)
    assert cfg == ExperimentConfig()
    assert cfg.train.lr == 3e-4 and cfg.sampler.kernel == "flow_sde" and cfg.reward.weights == {"shapes_partial": 1.0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]
    # mutable defaults are not shared between instances
    assert ExperimentConfig().reward.weights is not ExperimentConfig().reward.weights


def test_unknown_key_in_file_names_full_path_and_closest(tmp_path):
    p = _write(tmp_path / "x.yaml", "train:\n  lrr: 1.0e-4\n")
    msg = _err(load_config, p)
    assert "train.lrr" in msg and "train.lr" in msg and "x.yaml" in msg
    # a field put in the wrong section is found in the right one
    p = _write(tmp_path / "y.yaml", "sampler:\n  lr: 0.1\n")
    assert "train.lr" in _err(load_config, p)
    # an unknown section
    p = _write(tmp_path / "z.yaml", "trian:\n  lr: 0.1\n")
    assert "'train'" in _err(load_config, p)


def test_unknown_key_override():
    msg = _err(load_config, None, ["credit.nmae=turning_points"])
    assert "credit.nmae" in msg and "credit.name" in msg
    assert "train.group_size" in _err(load_config, None, ["train.groupsize=4"])


@pytest.mark.parametrize("typed, meant", [
    ("eval.seeds=2", "eval.seeds_per_prompt"),  # `flowalign eval --seeds`; difflib's pick was eval.steps
    ("train.learning_rate=1e-4", "train.lr"),  # difflib's pick was train.clip_range
    ("eval.prompts=x", "data.eval_prompts"),  # difflib's pick was eval.max_prompts
    ("train.batch_size=8", "train.micro_batch"),  # difflib's pick was train.group_size
    ("sampler.step=3", "'sampler.steps'"),
])
def test_unknown_key_hint_names_the_field_meant_not_a_near_spelling(typed, meant):
    """Following a hint must not silently change another setting: common names from other tools and keys typed
    short map to the field they mean."""
    msg = _err(load_config, None, [typed])
    hint = msg.split("did you mean", 1)[1]
    assert meant in hint, msg
    assert not any(w in hint for w in ("eval.steps", "clip_range", "max_prompts", "group_size")), msg


def test_a_yaml_date_is_a_string_where_the_field_is_a_string(tmp_path):
    """YAML reads `run_dir: 2024-06-01` as a date: that was refused ("expected a string, got datetime.date"), while
    the same value as an override was accepted."""
    p = _write(tmp_path / "x.yaml", "output:\n  run_dir: 2024-06-01\n")
    assert load_config(p).output.run_dir == "2024-06-01"
    assert load_config(None, ["output.run_dir=2024-06-01"]).output.run_dir == "2024-06-01"
    p = _write(tmp_path / "y.yaml", "output:\n  run_dir: 2024-06-01 12:30:00\n")  # a timestamp: as typed, too
    assert load_config(p).output.run_dir == load_config(None, ["output.run_dir=2024-06-01 12:30:00"]).output.run_dir


def test_pyyaml_string_float_is_coerced(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-4 without a dot as the *string* '1e-4'
    import yaml

    assert yaml.safe_load("lr: 1e-4")["lr"] == "1e-4"
    p = _write(tmp_path / "x.yaml", "train:\n  lr: 1e-4\n  clip_range: 2e-6\n  iterations: 1e3\nmodel:\n  guidance: 5\n")
    cfg = load_config(p)
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.clip_range == pytest.approx(2e-6)
    assert cfg.train.iterations == 1000 and isinstance(cfg.train.iterations, int)
    assert isinstance(cfg.model.guidance, float) and cfg.model.guidance == 5.0
    cfg = load_config(None, ["train.lr=3e-5", "train.ema=false", "data.shuffle=no", "train.betas=[0.9, 0.99]"])
    assert cfg.train.lr == pytest.approx(3e-5) and cfg.train.ema is False and cfg.data.shuffle is False
    assert cfg.train.betas == (0.9, 0.99) and isinstance(cfg.train.betas, tuple)


def test_wrong_types_fail():
    assert "train.group_size" in _err(load_config, None, ["train.group_size=2.5"])
    assert "train.lr" in _err(load_config, None, ["train.lr=fast"])
    assert "train.ema" in _err(load_config, None, ["train.ema=maybe"])
    assert "train.betas" in _err(load_config, None, ["train.betas=[0.9]"])
    assert "reward.weights" in _err(load_config, None, ["reward.weights=3"])
    msg = _err(load_config, None, ["sampler.kernel=flowsde"])
    assert "flow_sde" in msg and "euler" in msg and "cps" in msg  # lists the valid choices
    msg = _err(load_config, None, ["train=5"])
    assert "section" in msg
    assert "no sub-keys" in _err(load_config, None, ["train.lr.x=1"])


def test_nested_dict_overrides(tmp_path):
    cfg = load_config(None, ["reward.weights.pickscore=0.5"])
    assert cfg.reward.weights == {"shapes_partial": 1.0, "pickscore": 0.5}
    cfg = load_config(None, ["reward.weights.pickscore=1", "reward.weights.shapes_partial=null"])
    assert cfg.reward.weights == {"pickscore": 1.0} and isinstance(cfg.reward.weights["pickscore"], float)
    cfg = load_config(None, ["reward.weights={hps: 2, pickscore: 1}"])
    assert cfg.reward.weights == {"hps": 2.0, "pickscore": 1.0}
    cfg = load_config(None, ["reward.kwargs.pickscore.path=/w/pick", "credit.options.probe=ode:2"])
    assert cfg.reward.kwargs == {"pickscore": {"path": "/w/pick"}} and cfg.credit.options == {"probe": "ode:2"}
    assert "pickscore" in _err(load_config, None, ["reward.weights.pickscor=1"])  # reward names are checked
    # a file that sets a mapping field replaces the default mapping as a whole
    p = _write(tmp_path / "x.yaml", "reward:\n  weights: {pickscore: 1.0}\n")
    assert load_config(p).reward.weights == {"pickscore": 1.0}


def test_includes_merge_relative(tmp_path):
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "base.yaml", "train:\n  lr: 1e-4\n  group_size: 4\nsampler:\n  eta: 0.5\n")
    _write(tmp_path / "sub" / "scale.yaml", "defaults: [../base.yaml]\ntrain:\n  groups_per_iter: 48\n")
    cfg = load_config(tmp_path / "sub" / "scale.yaml", ["sampler.steps=12"])
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.train.group_size == 4  # from base
    assert cfg.train.groups_per_iter == 48 and cfg.sampler.eta == 0.5 and cfg.sampler.steps == 12
    assert cfg.train.micro_batch == 16  # untouched default
    # `base:` as a single string; the including file wins over its base
    _write(tmp_path / "top.yaml", "base: base.yaml\ntrain:\n  lr: 2e-4\n")
    assert load_config(tmp_path / "top.yaml").train.lr == pytest.approx(2e-4)
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    assert "cycle" in _err(load_config, tmp_path / "a.yaml")
    _write(tmp_path / "c.yaml", "base: nope.yaml\n")
    assert "nope.yaml" in _err(load_config, tmp_path / "c.yaml")


def test_malformed_yaml_and_missing_file(tmp_path):
    p = _write(tmp_path / "bad.yaml", "train:\n  lr: 1e-4\n  group_size: [1, 2\nmodel:\n  name: shapes\n")
    msg = _err(load_config, p)
    assert "bad.yaml:" in msg and "malformed YAML" in msg
    line = int(msg.split("bad.yaml:")[1].split(":")[0])
    assert 3 <= line <= 5
    assert "not found" in _err(load_config, tmp_path / "missing.yaml")
    p = _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    assert "mapping" in _err(load_config, p)
    p = _write(tmp_path / "typed.yaml", "train:\n  iterations: many\n")
    msg = _err(load_config, p)
    assert "typed.yaml" in msg and "train.iterations" in msg


def test_divisibility_error_names_numbers():
    cfg = load_config(None, ["train.groups_per_iter=6"])
    msg = _err(derived, cfg, 4)
    assert "6" in msg and "4" in msg and "train.groups_per_iter" in msg
    d = derived(cfg, 2)
    assert d["groups_per_rank"] == 3 and d["rollouts_per_rank"] == 3 * cfg.train.group_size


def test_derived_quantities():
    cfg = load_config(None)
    d = derived(cfg)
    assert d["rollouts_per_iter"] == 64
    assert d["trained_steps"] == 9  # floor(0.99 * 10), Flow-GRPO
    assert d["transitions_per_iter"] == 64 * 9
    assert d["micro_batches_per_rank"] == math.ceil(64 * 9 / 16)
    cfg = load_config(None, ["sampler.train_fraction=1.0"])
    assert trained_steps(cfg.sampler) == 9  # the last step is never trained
    cfg = load_config(None, ["sampler.kernel=cps", "sampler.window_size=3", "sampler.window_range=[0, 5]"])
    d = derived(cfg)
    assert d["trained_steps"] == 3 and d["window_starts"] == [0, 1, 2]  # METHODS §3.10 Fast
    cfg = load_config(None, ["train.optimizer_steps_per_iter=2", "train.micro_batch=4"])
    assert derived(cfg)["micro_batches_per_optimizer_step"] == math.ceil(64 * 9 / 4 / 2)
    # TempFlow branching: G seeds x K children per branch step, each child trained on its branch edge only
    cfg = load_config(None, ["sampler.plan=branch", "train.group_size=2", "train.micro_batch=16",
                             "sampler.plan_options={children: 4, branch_steps: random}"])
    d = derived(cfg)
    assert d["rollouts_per_iter"] == 8 * 2 * 4 and d["samples_per_seed"] == 4
    assert d["transitions_per_iter"] == 64 and d["micro_batches_per_rank"] == 4
    cfg = load_config(None, ["sampler.plan=branch", "sampler.plan_options={children: 3, branch_steps: all}"])
    assert derived(cfg)["rollouts_per_iter"] == 8 * 8 * 3 * 9  # every stochastic step (the last is ODE)
    cfg = load_config(None, ["sampler.plan=branch", "sampler.train_fraction=0.6",
                             "sampler.plan_options={children: 3, branch_steps: all}"])
    assert derived(cfg)["rollouts_per_iter"] == 8 * 8 * 3 * 6  # only trained steps are branch candidates
    assert "sampler.plan_options" in _err(load_config, None, ["sampler.plan=branch",
                                                             "sampler.plan_options={branch_steps: sometimes}"])


@pytest.mark.parametrize(
    "override, field",
    [
        ("sampler.eta=-0.1", "sampler.eta"),
        ("sampler.steps=1", "sampler.steps"),
        ("sampler.train_fraction=0", "sampler.train_fraction"),
        ("sampler.train_fraction=1.5", "sampler.train_fraction"),
        ("train.clip_range=0", "train.clip_range"),
        ("train.group_size=1", "train.group_size"),
        ("credit.std_ddof=2", "credit.std_ddof"),
        ("model.name=sd35", "model.name"),
    ],
)
def test_range_validation(override, field):
    assert field in _err(load_config, None, [override])


def test_window_validation():
    msg = _err(load_config, None, ["sampler.window_size=4", "sampler.window_range=[0, 3]"])
    assert "window" in msg


def test_dump_load_round_trip(tmp_path):
    cfg = load_config(None, [
        "train.lr=1e-5", "train.adam_eps=1e-12", "train.betas=[0.8, 0.95]", "sampler.window_range=[1, 6]",
        "sampler.window_size=2", "sampler.kernel=cps", "reward.weights={pickscore: 0.5, hps: 1.5}",
        "reward.kwargs.pickscore.path=/w/p", "credit.options={probe: 'ode:2', k: 3}", "model.path=/x: y",
        "eval.rewards=[shapes_strict]", "output.run_dir=runs/t",
    ])
    path = tmp_path / "out" / "config.yaml"
    dump_yaml(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert again.train.adam_eps == 1e-12 and again.model.path == "/x: y"
    assert from_dict(to_dict(cfg)) == cfg
    assert not list((tmp_path / "out").glob(".*tmp"))  # atomic write left no temp file


def test_apply_overrides_on_config():
    cfg = load_config(None)
    new = apply_overrides(cfg, ["train.iterations=5", "credit.name=dense_gain"])
    assert new.train.iterations == 5 and new.credit.name == "dense_gain" and cfg.train.iterations == 100


def test_describe_documents_every_field():
    import yaml

    text = describe(ExperimentConfig)
    parsed = yaml.safe_load(text)  # the description is a valid YAML template of the defaults
    assert from_dict(parsed) == ExperimentConfig()

    for section in dataclasses.fields(ExperimentConfig):
        cls = type(getattr(ExperimentConfig(), section.name))
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{section.name}.{f.name} has no doc"
            assert f"  {f.name}: " in text
    assert "(float32|bfloat16|float16)" in text


def test_summary_mentions_derived():
    cfg = load_config(None, ["train.groups_per_iter=4", "train.group_size=6"])
    text = summary(cfg, world_size=2)
    assert "24 rollouts/iter" in text and "2 groups/rank" in text and "flow_sde" in text


TRAIN_CONFIGS = [p for p in CONFIG_FILES if "pretrain" not in p.name]
PRETRAIN_CONFIGS = [p for p in CONFIG_FILES if "pretrain" in p.name]


@pytest.mark.skipif(not CONFIG_FILES, reason="no configs/*.yaml yet")
@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=[p.name for p in TRAIN_CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    derived(cfg, 1)
    assert load_config(path) == cfg


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS, ids=[p.name for p in PRETRAIN_CONFIGS])
def test_shipped_pretraining_configs_load_with_their_own_schema(path):
    """``flowalign pretrain`` reads these with ``PretrainConfig`` (strict: an unknown key fails), not the trainer's."""
    from flowalign.pretrain import PretrainConfig, load_config as load_pretrain

    cfg = load_pretrain(str(path), {})
    assert isinstance(cfg, PretrainConfig) and cfg.steps > 0
    assert load_pretrain(str(path), {}) == cfg


def test_an_empty_config_file_warns_and_uses_the_defaults(tmp_path, caplog):
    f = tmp_path / "empty.yaml"
    f.write_text("# nothing yet\n")
    with caplog.at_level("WARNING"):
        cfg = load_config(str(f))
    assert cfg == ExperimentConfig() and "is empty" in caplog.text


def test_duplicate_yaml_keys_are_refused_with_their_line(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("train:\n  lr: 1.0e-4\n  iterations: 3\n  lr: 2.0e-4\n")
    with pytest.raises(UserError, match=r"dup.yaml:4:3: malformed YAML: duplicate key 'lr' \(first on line 2\)"):
        load_config(str(f))


def test_duplicate_keys_inside_an_override_value_are_refused(tmp_path):
    # PyYAML keeps the last of two equal keys silently: {probe: x0, probe: "ode:2"} would have probed with ode:2
    with pytest.raises(UserError, match=r"override 'credit.options=\{probe: x0, probe: ode:2\}': duplicate key 'probe' "
                                        r"in the value; keep one"):
        load_config(None, ["credit.options={probe: x0, probe: ode:2}"])
    cfg = load_config(None, ['credit.options={probe: "ode:2"}'])
    assert cfg.credit.options == {"probe": "ode:2"}


def test_eval_kernel_other_than_the_ode_is_refused_at_load():
    # evaluate.run_eval samples with the ODE only; an SDE kernel used to pass validation and crash after config.yaml
    with pytest.raises(UserError, match=r"eval.kernel: 'flow_sde' is not one of 'euler'"):
        load_config(None, ["eval.kernel=flow_sde"])


def test_derived_micro_batches_count_the_update_loop_per_optimizer_step():
    """24 transitions, micro-batch 8, 2 optimizer steps: the update splits 12 + 12 and runs 2 + 2 = 4 micro-batches
    (it said 3, counting before the split); 10 transitions with 4 steps are 3 + 3 + 2 + 2, one micro-batch each.
    More optimizer steps than transitions is refused; as many micro-batches as steps is not needed."""
    d = derived(load_config(None, ["train.groups_per_iter=1", "train.group_size=4", "sampler.steps=10",
                                   "sampler.train_fraction=0.6", "train.micro_batch=8", "train.optimizer_steps_per_iter=2"]))
    assert d["transitions_per_rank"] == 24 and d["micro_batches_per_rank"] == 4 and d["micro_batches_per_optimizer_step"] == 2
    d = derived(load_config(None, ["train.groups_per_iter=1", "train.group_size=2", "sampler.steps=10",
                                   "sampler.train_fraction=0.5", "train.micro_batch=16", "train.optimizer_steps_per_iter=4"]))
    assert d["transitions_per_rank"] == 10 and d["micro_batches_per_rank"] == 4
    with pytest.raises(UserError, match="exceeds the 10 transitions per rank"):
        derived(load_config(None, ["train.groups_per_iter=1", "train.group_size=2", "sampler.steps=10",
                                   "sampler.train_fraction=0.5", "train.optimizer_steps_per_iter=11"]))


# ------------------------------------------------------------------------------------ seeds the trainer cannot use
# train.seed beyond what torch.manual_seed takes used to pass the config and crash deep in train().


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


# ------------------------------------------------------------------------------------------------- YAML merge keys
# <<: *anchor was refused as "malformed YAML" by the duplicate-key loader.


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


# -------------------------------------------------------------------------------------- parser and coercion errors
# Errors of the parser or the coercion that are not YAMLError used to escape as tracebacks.


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


# -------------------------------------------------------------------------------- removing a key that is not there
# '=null' on a mapping key that is not there (a typo) used to be silently ignored.


def test_removing_a_missing_mapping_key_is_refused():
    msg = _err(load_config, None, ["reward.weights={pickscore: 1.0, shapes_partial: 1.0}",
                                   "reward.weights.pickscroe=null"])
    assert "reward.weights.pickscroe" in msg and "'pickscore'" in msg
    assert "credit.options.probe" in _err(load_config, None, ["credit.options.probe=null"])
    # removing a key that is there still works, nested too
    cfg = load_config(None, ["reward.weights={pickscore: 1.0, shapes_partial: 1.0}", "reward.weights.pickscore=null",
                             "reward.kwargs.pickscore.path=/w", "reward.kwargs.pickscore.path=null"])
    assert cfg.reward.weights == {"shapes_partial": 1.0} and cfg.reward.kwargs == {"pickscore": {}}


# ------------------------------------------------------------------------------------- int fields and large floats


def test_int_field_refuses_a_float_it_cannot_hold_exactly():
    # 9007199254740993.0 parses as the float 9007199254740992.0: the run would use another seed than the one typed
    assert "train.seed" in _err(load_config, None, ["train.seed=9007199254740993.0"])
    assert "train.iterations" in _err(load_config, None, ["train.iterations=1e30"])
    # ordinary float spellings of ints still coerce
    cfg = load_config(None, ["train.iterations=1e3", "train.seed=2.0e+3", "train.group_size=4.0"])
    assert (cfg.train.iterations, cfg.train.seed, cfg.train.group_size) == (1000, 2000, 4)
    assert load_config(None, ["train.seed=9007199254740993"]).train.seed == 9007199254740993  # as an int: exact
    assert ExperimentConfig().train.seed == 42


def test_a_missing_example_config_says_it_lives_in_a_source_checkout(tmp_path, monkeypatch, capsys):
    """`flowalign train configs/shapes_grpo.yaml` outside a source checkout (a pip-installed wheel has no configs/)
    said only `config file not found: /abs/configs/shapes_grpo.yaml`; the line now says where the example configs
    live and how to fix it, still one line with exit code 2."""
    from cli_checks import fails

    monkeypatch.chdir(tmp_path)
    for argv, given in ((["train", "configs/shapes_grpo.yaml"], "configs/shapes_grpo.yaml"),
                        (["train", "./configs/shapes_grpo.yaml"], "configs/shapes_grpo.yaml"),
                        (["pretrain", "--config", "configs/shapes_pretrain.yaml", "--out", str(tmp_path / "o")],
                         "configs/shapes_pretrain.yaml")):
        fails(capsys, argv, "not found", given, str(tmp_path / given), "configs/ directory of a flowalign source "
              "checkout", "run from the root of a flowalign checkout", "pass the path to a YAML file")
    assert not (tmp_path / "o").exists()
    msg = _err(load_config, "configs/shapes_grpo.yaml")
    assert "source checkout" in msg and "run from the root of a flowalign checkout" in msg
    # any other missing file: the fix (a YAML path), without claiming it is one of the example configs
    for given in ("my.yaml", str(tmp_path / "configs" / "my.yaml")):
        msg = _err(load_config, given)
        assert given in msg and "pass the path to a YAML file" in msg and "the example configs live" not in msg
    msg = _err(load_config, tmp_path)
    assert "it is a directory" in msg and "pass the path to a YAML file" in msg



# ------------------------------------------------------------------------------- coercion: bools are not numbers
# Python's bool is an int subclass: without the explicit refusals `train.iterations=true` ran 1 iteration.


@pytest.mark.parametrize("override, expected", [
    ("train.iterations=true", "expected an int, got True (bool)"),
    ("train.lr=true", "expected a float, got True (bool)"),
    ("train.ema=2", "expected a bool (true/false), got 2 (int)"),  # only 0 / 1 read as bools
])
def test_a_bool_is_not_a_number_and_a_number_other_than_0_1_is_not_a_bool(override, expected):
    """The coercion contract of the module docstring: values take the field type, and a bool for a numeric field
    (or 2 for a bool field) fails instead of becoming 1 / 1.0 / True."""
    msg = _err(load_config, None, [override])
    assert msg.startswith(f"override {override!r}: ") and expected in msg, msg
    cfg = load_config(None, ["train.ema=0", "data.shuffle=1"])
    assert cfg.train.ema is False and cfg.data.shuffle is True


def test_a_yaml_bool_in_a_file_is_not_a_string(tmp_path):
    """YAML 1.1 reads `path: yes` as True: a file's bool for a string field fails (it would become 'True'); a quoted
    '1_000' for an int field reads as 1000, like the unquoted YAML int."""
    p = _write(tmp_path / "x.yaml", "model:\n  path: yes\n")
    assert "model.path: expected a string, got True (bool)" in _err(load_config, p)
    p = _write(tmp_path / "y.yaml", "train:\n  iterations: '1_000'\n")
    assert load_config(p).train.iterations == 1000


# ------------------------------------------------------------------------------------------- files and includes


def test_an_empty_section_in_a_file_takes_the_defaults(tmp_path):
    """`train:` with every key commented out is YAML null: the section keeps its defaults (not 'needs a mapping')."""
    p = _write(tmp_path / "x.yaml", "train:\n  # lr: 1.0e-4\nsampler:\n  steps: 12\n")
    cfg = load_config(p)
    assert cfg.train == ExperimentConfig().train and cfg.sampler.steps == 12


def test_later_includes_win_over_earlier_ones(tmp_path):
    """Includes are merged first, in order (module docstring): with `defaults: [a.yaml, b.yaml]` b's value wins over
    a's, a's keys that b does not set survive, and the including file wins over both."""
    _write(tmp_path / "a.yaml", "train:\n  lr: 1.0e-4\n  group_size: 4\n")
    _write(tmp_path / "b.yaml", "train:\n  lr: 2.0e-4\n")
    _write(tmp_path / "top.yaml", "defaults: [a.yaml, b.yaml]\n")
    cfg = load_config(tmp_path / "top.yaml")
    assert cfg.train.lr == pytest.approx(2e-4) and cfg.train.group_size == 4
    _write(tmp_path / "rev.yaml", "defaults: [b.yaml, a.yaml]\ntrain:\n  group_size: 6\n")
    cfg = load_config(tmp_path / "rev.yaml")
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.train.group_size == 6


# ------------------------------------------------------------------------------------------------ override syntax


def test_override_splits_at_the_first_equals_sign_and_an_empty_value_is_an_empty_string():
    """`key=value` splits at the first '=' (a value may contain '='); `--key=value` is accepted; an empty value is
    the empty string, not YAML null (which would *remove* a mapping key)."""
    cfg = load_config(None, ["model.path=/w/a=b", "--train.lr=1e-5", "credit.options.probe="])
    assert cfg.model.path == "/w/a=b" and cfg.train.lr == pytest.approx(1e-5)
    assert cfg.credit.options == {"probe": ""}


def test_a_coercion_error_names_the_override_that_caused_it():
    """Overrides are coerced one by one so the line names the override (not just the field) that failed."""
    msg = _err(load_config, None, ["train.lr=1e-5", "train.group_size=2.5", "train.iterations=3"])
    assert msg.startswith("override 'train.group_size=2.5': train.group_size: expected an int"), msg


def test_home_relative_eta_file_is_expanded(tmp_path, monkeypatch):
    """Every path field of _USER_PATHS (output.run_dir, model.path, sampler.eta_file) expands a leading '~'."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["sampler.eta_file=~/eta.json", "output.run_dir=~/runs/x", "model.path=~/w"])
    assert cfg.sampler.eta_file == str(tmp_path / "eta.json")
    assert cfg.output.run_dir == str(tmp_path / "runs" / "x") and cfg.model.path == str(tmp_path / "w")


# ----------------------------------------------------------------------------------------- range checks at bounds


@pytest.mark.parametrize("override, msg", [
    ("train.betas=[0.9, 1.0]", "train.betas=(0.9, 1.0) must be in [0, 1)"),
    ("train.ema_decay_max=1.0", "train.ema_decay_max=1.0 must be in [0, 1)"),
])
def test_half_open_ranges_refuse_their_upper_end(override, msg):
    """AdamW's betas and the EMA decay cap are in [0, 1): 1 would freeze the moment estimate / the EMA."""
    assert msg in _err(load_config, None, [override])


def test_zero_iterations_is_a_valid_run():
    """train.iterations >= 0: 0 iterations (evaluate the base model only) loads, with zero totals."""
    d = derived(load_config(None, ["train.iterations=0"]))
    assert d["optimizer_steps_total"] == 0 and d["rollouts_total"] == 0 and d["ema_updates_total"] == 0


def test_window_range_must_end_before_the_last_step():
    """METHODS §2.6: the window start range lies in [0, T-1] (the last step is never trained); hi = T-1 loads."""
    msg = _err(load_config, None, ["sampler.window_size=3", "sampler.window_range=[5, 10]"])
    assert "must lie in [0, steps-1=9]" in msg
    cfg = load_config(None, ["sampler.window_size=3", "sampler.window_range=[6, 9]"])
    assert derived(cfg)["window_starts"] == [6]


# ------------------------------------------------------------------------------------------ derived quantities


def test_trained_steps_floor_is_exact_for_decimal_fractions():
    """trained = floor(frac·T) as typed (Flow-GRPO): 0.58 x 50 is 28.999999999999996 in binary floating point, and
    the run trains 29 steps, not 28 (the + 1e-9 in trained_steps)."""
    cfg = load_config(None, ["sampler.steps=50", "sampler.train_fraction=0.58"])
    assert trained_steps(cfg.sampler) == 29


def test_default_window_range_spans_every_step_but_the_last():
    """window_range (0, 0) means (0, T-1) (METHODS §2.6): with T=10, n=3 the starts are t0 in 0..6."""
    cfg = load_config(None, ["sampler.window_size=3"])
    assert derived(cfg)["window_starts"] == [0, 1, 2, 3, 4, 5, 6] and trained_steps(cfg.sampler) == 3


def test_a_window_pinned_at_step_0_of_ddim_sde_trains_one_step_less():
    """ddim_sde draws no noise at step 0 (σ = 1): a window pinned at (0, n) holds n-1 trainable steps; pinned later,
    or free to move (an upper bound), it counts n."""
    pinned = ["sampler.kernel=ddim_sde", "sampler.window_size=3"]
    assert trained_steps(load_config(None, [*pinned, "sampler.window_range=[0, 3]"]).sampler) == 2
    assert trained_steps(load_config(None, [*pinned, "sampler.window_range=[1, 4]"]).sampler) == 3
    assert trained_steps(load_config(None, [*pinned, "sampler.window_range=[0, 5]"]).sampler) == 3
    # flow_sde is stochastic at step 0: the pinned window counts all n
    assert trained_steps(load_config(None, ["sampler.window_size=3", "sampler.window_range=[0, 3]"]).sampler) == 3


def test_derived_run_totals():
    """The documented derived keys: totals over the run (all ranks), EMA updates only with train.ema, one sampling
    forward per step per rollout (chain plan), (sample, noise level) rows for nft."""
    cfg = load_config(None, ["train.iterations=10", "train.groups_per_iter=4", "train.group_size=3",
                             "train.optimizer_steps_per_iter=3", "train.ema_every=4", "sampler.steps=6"])
    d = derived(cfg, 2)
    assert d["rollouts_per_rank"] == 2 * 3 and d["rollouts_per_iter"] == 12
    assert d["rollouts_total"] == 10 * 12  # every rank's rollouts
    assert d["optimizer_steps_total"] == 30 and d["ema_updates_total"] == 30 // 4
    assert d["nfe_rollout_per_iter"] == 4 * 3 * 6  # T forwards per rollout, all T steps sampled
    assert derived(apply_overrides(cfg, ["train.ema=false"]), 2)["ema_updates_total"] == 0
    nft = derived(apply_overrides(cfg, ["train.objective=nft", "train.nft_times=5"]), 2)
    assert nft["nft_rows_per_rank"] == 6 * 5


def test_as_many_optimizer_steps_as_transitions_is_allowed():
    """Each optimizer step needs >= 1 transition: 10 transitions per rank take 10 steps of one transition each."""
    d = derived(load_config(None, ["train.groups_per_iter=1", "train.group_size=2", "sampler.steps=10",
                                   "sampler.train_fraction=0.5", "train.optimizer_steps_per_iter=10"]))
    assert d["transitions_per_rank"] == 10 and d["micro_batches_per_rank"] == 10


def test_divisibility_error_suggests_positive_multiples():
    """The world-size error names the nearest multiples of the world size, never 0 groups."""
    assert "(e.g. 4 or 8)" in _err(derived, load_config(None, ["train.groups_per_iter=6"]), 4)
    msg = _err(derived, load_config(None, ["train.groups_per_iter=3"]), 4)
    assert "e.g. 4" in msg and "e.g. 0" not in msg


def test_summary_says_a_window_moves_only_when_its_range_is_wider():
    """Q5: each group draws its window start only when window_range is wider than the window; pinned, it does not."""
    moving = summary(load_config(None, ["sampler.window_size=3", "sampler.window_range=[1, 6]"]))
    pinned = summary(load_config(None, ["sampler.window_size=3", "sampler.window_range=[2, 5]"]))
    assert "window 3 in (1, 6), start drawn per group" in moving
    assert "window 3 in (2, 5)" in pinned and "drawn per group" not in pinned


@pytest.mark.parametrize("override, key, fixed", [
    ("reward.weights={saturation:1.0}", "saturation:1.0", "'reward.weights={saturation: 1.0}'"),
    ("reward.weights={shapes_partial: 1, saturation:0.5}", "saturation:0.5",
     "'reward.weights={shapes_partial: 1, saturation: 0.5}'"),
    ("reward.weights={saturation :1}", "saturation :1", "'reward.weights={saturation: 1}'"),
    ("reward.kwargs={pickscore: {path:/w}}", "path:/w", "'reward.kwargs={pickscore: {path: /w}}'"),
    ("credit.options={probe:3}", "probe:3", "'credit.options={probe: 3}'"),  # a dict[str, Any]: no type error to hint
    ("credit={name:outcome}", "name:outcome", "'credit={name: outcome}'"),  # a section
])
def test_a_flow_mapping_item_without_the_space_after_the_colon_says_so(override, key, fixed):
    """YAML reads `{saturation:1.0}` as the key 'saturation:1.0' with no value: the error was `reward.weights.
    saturation:1.0: expected a float, got None`, and for an untyped mapping (credit.options) none came at all."""
    msg = _err(load_config, REPO / "configs" / "shapes_grpo.yaml", [override])
    assert msg == (f"override {override!r}: {key!r} reads as one key with no value; YAML needs a space after ':' — "
                   f"write {fixed} (quoted, for the shell)"), msg


def test_a_colon_in_a_key_or_text_that_is_meant_is_left_alone():
    """A quoted key is meant as written, a string field takes the text as typed, a spaced item is a mapping, and a
    mapping field given `name:value` without braces is told the same fix."""
    assert "space after" not in _err(load_config, None, ['reward.weights={"a:b": null}'])
    assert load_config(None, ["output.run_dir={a:b}"]).output.run_dir == "{a:b}"
    assert load_config(None, ["reward.weights={saturation: 1.0}"]).reward.weights == {"saturation": 1.0}
    msg = _err(load_config, None, ["reward.weights=saturation:1.0"])
    assert msg.endswith("YAML needs a space after ':' — write {saturation: 1.0}"), msg
    assert "space after" not in _err(load_config, None, ["reward.weights=http://x"])
