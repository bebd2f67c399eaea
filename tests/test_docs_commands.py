"""Every `flowalign ...` command in a code block of README.md and docs/*.md is one the code accepts: its flags parse
with the command's own parser, the names it gives (rewards, benchmarks, prompt sets, models, kernels, bench
methods, architectures) are registered, and a `flowalign train CONFIG overrides` validates (`--describe`, which
checks keys, types and component names without training). Nothing runs: the parser stops the command once it has
parsed. A renamed flag or registry entry that the docs still use fails here, naming the file and line."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from flowalign import cli
from flowalign.errors import CommandParser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# a command holding one of these shows a placeholder or shell syntax, not a literal command line
PLACEHOLDER = re.compile(r"[<>…{}$\[\]*]|\.\.\.")


def documented_commands() -> list[tuple[str, str]]:
    """(file:line, command) for each line of a fenced code block that starts with `flowalign `; a trailing `\\`
    joins the next line, as in the shell."""
    found = []
    for path in DOCS:
        in_block, start, pending = False, 0, None
        for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
            if line.strip().startswith("```"):
                in_block, pending = not in_block, None
                continue
            if not in_block:
                continue
            text = line.strip()
            if pending is None:
                if not text.startswith("flowalign "):
                    continue
                start, pending = n, ""
            pending += " " + text
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            found.append((f"{path.relative_to(ROOT)}:{start}", pending.strip()))
            pending = None
    return found


def with_options(cmd: str) -> str:
    """An optional option shown as `[--flag VALUE]` is taken as given; `[a | b]` alternatives are left alone."""
    return re.sub(r"\[(--[^\]|]*)\]", r"\1", cmd)


COMMANDS = [(where, with_options(cmd)) for where, cmd in documented_commands()
            if not re.match(r"flowalign [\w -]+: error:", cmd)]  # a quoted error line, not a command
LITERAL = [(where, cmd) for where, cmd in COMMANDS if not PLACEHOLDER.search(cmd.split(" #")[0])]


class Parsed(Exception):
    """Raised by the patched parser once a command's arguments have parsed: (prog, namespace)."""


def _names(value) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


def check_names(prog: str, ns) -> list[str]:
    """What in a parsed namespace names something no registry holds (empty: all registered)."""
    from flowalign import bench_credit, bench_snr
    from flowalign.bench_memory import architectures
    from flowalign.data import BUILTIN_PROMPTS
    from flowalign.evaluate import list_protocols
    from flowalign.models import MODELS
    from flowalign.rewards import REWARDS
    from flowalign.samplers.kernels import KERNELS

    args = {k: v for k, v in vars(ns).items() if v not in (None, "", [], False)}
    bad = []
    reward_flags = ("rewards", "eval_rewards", "rank_reward", "plot_reward") + (() if prog == "flowalign compare" else ("reward",))
    for flag in reward_flags:  # compare's --reward names a summary metric, not a reward model
        bad += [f"--{flag} {r}" for r in _names(args.get(flag, "")) if r not in REWARDS]
    if "benchmark" in args and args["benchmark"] not in list_protocols() and not args["benchmark"].endswith(".yaml"):
        bad.append(f"--benchmark {args['benchmark']}")
    for flag in ("prompts", "prompt_file"):  # a prompt-set name (a path is the user's own file)
        value = args.get(flag)
        if isinstance(value, str) and "/" not in value and "." not in value and value not in BUILTIN_PROMPTS:
            bad.append(f"--{flag} {value}")
    if "model" in args and prog != "flowalign bench credit" and args["model"] not in MODELS:
        bad.append(f"--model {args['model']}")
    if "kernel" in args and args["kernel"] not in KERNELS:
        bad.append(f"--kernel {args['kernel']}")
    if prog == "flowalign bench credit":
        bad += [f"--methods {m}" for m in _names(args["methods"]) if m not in bench_credit.METHODS]
        bad += [f"--models {m}" for m in _names(args["models"]) if m not in ("shapes", "shapes_video", "sd3")]
        if args.get("rank_references"):
            bench_credit.parse_references(args["rank_references"])  # raises on a bad reference
    if prog == "flowalign bench grad-snr":
        bad += [f"--methods {m}" for m in _names(args["methods"]) if m not in bench_snr.CREDITS]
    if prog == "flowalign bench train-memory":
        bad += [f"--arch {a}" for a in _names(args.get("arch", "")) if a not in architectures()]
        bad += [f"--models {m}" for m in _names(args.get("models", "")) if m not in MODELS]
    return bad


def run_parse_only(argv: list[str], monkeypatch) -> tuple[object, str]:
    """Run `flowalign ARGV` until its parser has parsed: ('parsed', prog, ns), or the exit code and stderr."""
    real_parse, real_intermixed = CommandParser.parse_args, CommandParser.parse_intermixed_args

    def stop(real):
        def parse(self, args=None, namespace=None):
            raise Parsed(self.prog, real(self, args, namespace))
        return parse

    err, out = io.StringIO(), io.StringIO()
    with monkeypatch.context() as patch:
        if argv[0] != "train":  # train: --describe validates the config and stops by itself
            patch.setattr(CommandParser, "parse_args", stop(real_parse))
            patch.setattr(CommandParser, "parse_intermixed_args", stop(real_intermixed))
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                rc = cli.main(argv)
        except Parsed as parsed:
            return parsed.args, err.getvalue()
        except SystemExit as exc:
            rc = exc.code
    return rc, err.getvalue()


def test_the_docs_show_commands_and_most_are_literal():
    """The extraction finds the README's and docs' command lines (a regex that stopped matching would make the
    test below check nothing), and only a few hold placeholders."""
    wheres = {w.split(":")[0] for w, _ in LITERAL}
    assert {"README.md", "docs/benchmarks.md", "docs/credit.md", "docs/steering.md"} <= wheres
    assert len(LITERAL) >= 60 and len(LITERAL) >= 0.85 * len(COMMANDS), (len(LITERAL), len(COMMANDS))
    assert any(cmd.startswith("flowalign train configs/shapes_grpo.yaml") for _, cmd in LITERAL)


@pytest.mark.parametrize("where,cmd", LITERAL, ids=[w for w, _ in LITERAL])
def test_documented_command_parses_and_names_registered_things(where, cmd, monkeypatch, tmp_path):
    argv = shlex.split(cmd, comments=True)[1:]
    if argv[0] == "train" and not {"-h", "--help", "--describe"} & set(argv):
        argv = [*argv, "--describe"]
    monkeypatch.chdir(ROOT)  # configs/... paths are relative to the repository, as the docs assume
    result, stderr = run_parse_only(argv, monkeypatch)
    if isinstance(result, tuple):
        prog, ns = result
        assert not check_names(prog, ns), f"{where}: {cmd}\n  names nothing registered: {check_names(prog, ns)}"
    else:
        assert result in (0, None), f"{where}: {cmd}\n  exit {result}: {stderr.strip()}"


def test_the_check_catches_a_renamed_flag_and_an_unknown_name(monkeypatch):
    """The check above can fail: an unknown flag exits 2, an unregistered reward or bench method is named."""
    monkeypatch.chdir(ROOT)
    rc, stderr = run_parse_only(["eval", "--benchmark", "shapes-bench", "--outdir", "x"], monkeypatch)
    assert rc == 2 and "--outdir" in stderr
    (prog, ns), _ = run_parse_only(["eval", "--prompts", "shapes-bench", "--rewards", "shapes_strict,shapes_perfect",
                                    "--out", "x"], monkeypatch)
    assert check_names(prog, ns) == ["--rewards shapes_perfect"]
    (prog, ns), _ = run_parse_only(["bench", "credit", "--methods", "flow_grpo,dense_gain"], monkeypatch)
    assert check_names(prog, ns) == ["--methods dense_gain"]
    rc, stderr = run_parse_only(["train", "configs/shapes_grpo.yaml", "train.learning_rate=1e-4", "--describe"],
                                monkeypatch)
    assert rc == 2 and "train.lr" in stderr


FILE_NAME = re.compile(r".*\.(py|yaml|yml|json|jsonl|png|md|html|txt|safetensors|pt|pth|bin|mp4|csv)$")


def dotted_names() -> list[tuple[str, str]]:
    """(file:line, name) for each code span of README.md and docs/*.md that is one dotted name, such as
    `train.nft_guidance`, `values.sde_mc_values` or `flowalign.shapes.render`, optionally called: `f(...)`."""
    found = []
    for path in DOCS:
        for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
            for span in re.findall(r"`([^`\n]+)`", line):
                m = re.fullmatch(r"((?:[a-z_][a-z_0-9]*\.)+[A-Za-z_][A-Za-z_0-9]*)(?:\(.*\))?", span.strip())
                if m:
                    found.append((f"{path.relative_to(ROOT)}:{n}", m.group(1)))
    return found


def resolves(name: str, leaves: set[str]) -> bool:
    """A config key (or a key inside a mapping-valued one), a file name, or an attribute of a flowalign module."""
    import importlib

    if name in leaves or any(name.startswith(leaf + ".") for leaf in leaves) or FILE_NAME.match(name):
        return True
    parts = name.removeprefix("flowalign.").split(".")
    for cut in range(len(parts), 0, -1):  # the longest importable module prefix, then attributes
        try:
            obj = importlib.import_module("flowalign." + ".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_names_in_the_docs_are_config_keys_or_code_that_exists():
    """A config key, function or module the docs name in a code span exists: `train.nft_noise` is a key of the
    schema, `values.refined_ode_values` a function of flowalign.values. Spans whose first part is neither a config
    section nor a flowalign module (`torch.float32`) are not ours to check."""
    import pkgutil

    import flowalign
    from flowalign import config as C

    leaves = set(C._leaf_paths(C.ExperimentConfig))
    ours = {leaf.split(".")[0] for leaf in leaves} | {m.name for m in pkgutil.iter_modules(flowalign.__path__)}
    names = [(w, n) for w, n in dotted_names() if n.removeprefix("flowalign.").split(".")[0] in ours]
    assert len(names) >= 100, len(names)  # the docs name many; a regex that stopped matching would check none
    missing = [f"{w}: `{n}`" for w, n in names if not resolves(n, leaves)]
    assert not missing, "the docs name what the code does not have:\n  " + "\n  ".join(missing)
    assert not resolves("train.nft_gudance", leaves) and not resolves("values.sde_mc_valuez", leaves)


def test_tests_the_docs_cite_exist():
    """`tests/test_x.py::test_name` in the docs names a test file and a test (or class) that exist, so a reader
    who runs it runs the check the docs describe."""
    import ast

    cited = []
    for path in DOCS:
        for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
            cited += [(f"{path.relative_to(ROOT)}:{n}", m.group(1), m.group(2))
                      for m in re.finditer(r"(tests/test_\w+\.py)(?:::(\w+))?", line)]
    assert len(cited) >= 20, len(cited)
    defined: dict[str, set[str]] = {}
    missing = []
    for where, file, name in cited:
        if not (ROOT / file).is_file():
            missing.append(f"{where}: {file}")
            continue
        if file not in defined:
            tree = ast.parse((ROOT / file).read_text(encoding="utf-8"))
            defined[file] = {d.name for d in ast.walk(tree) if isinstance(d, (ast.FunctionDef, ast.ClassDef))}
        if name and name not in defined[file]:
            missing.append(f"{where}: {file}::{name}")
    assert not missing, "the docs cite tests that do not exist:\n  " + "\n  ".join(missing)


@pytest.mark.parametrize("cmd, dest", [(["sample"], "prompt_file"), (["steer"], "prompt_file"), (["eval"], "prompts"),
                                       (["calibrate"], "prompts")])
def test_a_prompt_set_is_named_alike_by_every_command(cmd, dest, monkeypatch):
    """eval and calibrate took `--prompts`, sample and steer `--prompt-file` (where `--prompts` even suggested
    `--max-prompts`); each now takes both for the same option."""
    monkeypatch.chdir(ROOT)
    got = []
    for flag in ("--prompts", "--prompt-file"):
        (prog, ns), _ = run_parse_only([*cmd, flag, "shapes-bench", "--out", "x"], monkeypatch)
        got.append(getattr(ns, dest))
    assert got == ["shapes-bench", "shapes-bench"]


def test_help_shows_each_options_default_once(capsys):
    """`sample --help` did not say that --seeds defaults to 4 or --out to samples.png; options now show their
    default unless their text already speaks of one (no second "default"), and options without a value show none."""

    with pytest.raises(SystemExit) as exc:
        cli.main(["sample", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())  # argparse wraps lines
    assert "images per prompt (seeds seed..seed+n-1) (default: 4)" in text
    assert "(default: samples.png)" in text
    steps = text.split("--steps STEPS", 1)[1].split("--guidance", 1)[0]
    assert steps.count("default") == 1  # its own "(default: the model's own: ...)"
    lora = text.split("--lora LORA", 1)[1].split("--model-arg", 1)[0]
    assert "default" not in lora  # None: nothing to show


@pytest.mark.parametrize("bench", ["grad-snr", "noise-variance", "sample-gap", "credit"])
def test_the_shapes_benches_take_path_as_sample_does(bench, monkeypatch):
    """The shapes-world diagnostic benches named the model directory --shapes-path where sample, bench shapes-sample
    and motion-prior say --path; they take both."""
    monkeypatch.chdir(ROOT)
    got = []
    for flag in ("--path", "--shapes-path"):
        (prog, ns), _ = run_parse_only(["bench", bench, flag, "/some/dir"], monkeypatch)
        got.append(ns.shapes_path)
    assert got == ["/some/dir", "/some/dir"]


def test_reward_weights_read_alike_in_steer_and_calibrate():
    """steer wrote a weight NAME:W and calibrate NAME=W, and each refused the other's form as an unknown reward
    ('shapes_partial=1'); both now read either."""
    from flowalign.steer import _parse_weights

    assert _parse_weights("shapes_partial:0.5,saturation=2") == {"shapes_partial": 0.5, "saturation": 2.0}
    assert _parse_weights("shapes_partial") == {"shapes_partial": 1.0}
