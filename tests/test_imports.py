"""Import direction (DESIGN.md §2): types ← {samplers, rewards, models, shapes} ← values ← {credit, loss}
← {train, steer, evaluate} ← cli. A module may import only from its own level or below."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

LEVEL = {
    "types": 0, "errors": 0,
    "samplers": 1, "rewards": 1, "models": 1, "shapes": 1, "io": 1, "dist": 1,
    "values": 2, "data": 2, "config": 2,
    "credit": 3, "loss": 3, "pretrain": 3, "report": 3,
    "train": 4, "steer": 4, "evaluate": 4, "external": 4, "sample": 4, "bench": 4, "calibrate": 4,
    "cli": 5,
}


def _module_files():
    for folder, prefix in ((ROOT / "flowalign", "flowalign"), (ROOT / "samplers", "flowalign.samplers"),
                           (ROOT / "rewards", "flowalign.rewards")):
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield path, ".".join([prefix, *parts])


def _top(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_import_direction():
    bad = []
    for path, mod in _module_files():
        src_level = LEVEL.get(_top(mod))
        if src_level is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if not name.startswith("flowalign."):
                    continue
                dst = LEVEL.get(_top(name))
                if dst is not None and dst > src_level:
                    bad.append(f"{mod} -> {name}")
    assert not bad, "imports pointing the wrong way: " + ", ".join(bad)


def test_types_imports_nothing_from_the_package():
    tree = ast.parse((ROOT / "flowalign" / "types.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith("flowalign")


def test_no_model_family_named_outside_models():
    families = ("diffusers.StableDiffusion3", "FluxPipeline", "WanPipeline", "SD3Transformer2DModel")
    offenders = []
    for path, mod in _module_files():
        if ".models." in mod + "." or "/tests/" in str(path):
            continue
        text = path.read_text()
        offenders += [f"{mod}: {f}" for f in families if f in text]
    assert not offenders, offenders


def test_import_flowalign_is_light():
    code = ("import sys, flowalign, flowalign.samplers, flowalign.rewards, flowalign.types, flowalign.cli;"
            "heavy = [m for m in ('diffusers', 'transformers', 'peft', 'accelerate', 'torchvision') if m in sys.modules];"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"heavy modules imported at package import: {out}"


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "flowalign.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("train", "sample", "eval", "report", "pretrain", "rewards", "bench"):
        assert cmd in out.stdout
    bad = subprocess.run([sys.executable, "-m", "flowalign.cli", "trian"], capture_output=True, text=True)
    assert bad.returncode == 2 and "did you mean 'train'" in bad.stderr


def test_every_asset_folder_is_a_listed_package():
    """setuptools ships package data only of listed packages (and warns about the others at every install): each
    folder under flowalign/assets must be in pyproject.toml's packages, so a new asset folder cannot be left out of
    the wheel unnoticed."""
    import re

    block = re.search(r"^packages = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M)
    listed = set(re.findall(r'"([\w.]+)"', block.group(1)))   # no tomllib: Python 3.10 is supported
    folders = {"flowalign.assets"} | {
        "flowalign.assets." + ".".join(p.relative_to(ROOT / "flowalign" / "assets").parts)
        for p in (ROOT / "flowalign" / "assets").rglob("*") if p.is_dir() and p.name != "__pycache__"}
    assert folders <= listed, f"add to pyproject.toml packages: {sorted(folders - listed)}"
