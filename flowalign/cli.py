"""The ``flowalign`` command.

Each subcommand lives in the module that owns it and exposes ``cli_main(argv) -> int``; this file only
dispatches (lazily, so ``flowalign --help`` is fast). A ``UserError`` anywhere prints one line and exits 2; Ctrl-C
prints one line and exits 130.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Optional, Sequence

from flowalign.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("flowalign.train", "fine-tune a model (GRPO, or DiffusionNFT with train.objective=nft) from a YAML config (+ dotted overrides)"),
    "sample": ("flowalign.sample", "sample an image grid from a model (optional LoRA, chosen sampler)"),
    "eval": ("flowalign.evaluate", "evaluate a model on a prompt set x rewards -> results.jsonl, summary.json, report"),
    "import-scores": ("flowalign.external", "add an external evaluator's per-image results (GenEval, T2I-CompBench, VBench) to an eval directory"),
    "report": ("flowalign.report", "(re)build report.html for a run directory"),
    "compare": ("flowalign.compare", "compare runs (eval metric against rollouts and NFE) or evaluations (per-task change, paired intervals)"),
    "pretrain": ("flowalign.pretrain", "flow-matching pretraining (makes the built-in shapes image and video models)"),
    "rewards": ("flowalign.rewards.catalog", "list every reward: what it measures, weights, differentiable, range"),
    "bench": ("flowalign.bench", "benchmarks that print measured figures (`flowalign bench --help` lists them)"),
    "steer": ("flowalign.steer", "steer a model toward a reward at inference: best-of-N, FK particles, reward guidance"),
    "calibrate": ("flowalign.calibrate", "DenseGRPO reward-aware per-step noise calibration -> a per-step eta file"),
}


# commands that split their work over the processes of `accelerate launch` / torchrun
MULTI_PROCESS = ("train", "eval")
# commands that, launched so, would each do all of the work and write the same files at once
SINGLE_PROCESS = ("sample", "steer", "pretrain", "calibrate", "bench", "report", "compare", "import-scores")

# what to tell a user who pressed Ctrl-C, after "interrupted" (commands that can pick up where they stopped)
INTERRUPT_HINTS: dict[str, str] = {
    "train": "continue with output.resume=true",
    "pretrain": "continue from the last checkpoint with --resume (same --out; --config and flags as before, or none)",
    "eval": "continue with --resume (same arguments and --out)",
    "steer": "continue with --resume (same arguments and --out)",
}


def _usage() -> str:
    lines = ["usage: flowalign <command> [args]   (flowalign --version: the installed version)", "", "commands:"]
    width = max(map(len, COMMANDS))
    for name, (_, doc) in COMMANDS.items():
        lines.append(f"  {name:<{width}}  {doc}")
    lines += ["", "Run `flowalign <command> --help` for the command's options."]
    return "\n".join(lines)


class TorchvisionFallbackFilter(logging.Filter):
    """Drops transformers' "`XImageProcessor` requires torchvision (not installed); falling back to
    `XImageProcessorPil`" lines, which importing a diffusers pipeline prints (its IP-adapter image processors):
    flowalign installs no torchvision on purpose (rewards preprocess with their own tensor code) and never uses
    those processors, so the line only alarms. Every other transformers message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(_usage() + "\n")
        return 0
    if argv[0] in ("-V", "--version"):
        from flowalign import __version__

        sys.stdout.write(f"flowalign {__version__}\n")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(cmd, list(COMMANDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        sys.stderr.write(f"flowalign: unknown command {cmd!r}{hint} (see `flowalign --help`)\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, TorchvisionFallbackFilter) for f in quiet.filters):
        quiet.addFilter(TorchvisionFallbackFilter())
    rank = os.environ.get("RANK", "0").strip() or "0"  # under a launcher: rank 0 speaks for all (the error is the same)
    if rank != "0":  # the other ranks keep their warnings; their INFO lines repeated rank 0's
        logging.getLogger("flowalign").setLevel(logging.WARNING)
    try:
        from flowalign.dist import world_size_env, die_with_launcher

        world = world_size_env()
        die_with_launcher(world)
        if cmd in SINGLE_PROCESS and rest and world > 1 and not {"-h", "--help"} & set(rest):
            raise UserError(f"{cmd} runs in one process, but this is one of {world} (accelerate launch / torchrun "
                            f"sets WORLD_SIZE); run it without the launcher ({' and '.join(MULTI_PROCESS)} use several)")
        module = importlib.import_module(COMMANDS[cmd][0])
        return int(module.cli_main(rest) or 0)
    except UserError as err:
        if rank == "0":
            sys.stderr.write(f"flowalign {err.command or cmd}: error: {err}\n")
        return 2
    except KeyboardInterrupt as err:  # a command may raise it again with a hint of its own (train: its checkpoint)
        text = str(err) or INTERRUPT_HINTS.get(cmd, "")
        hint = f"; {text}" if text else ""
        if rank == "0":
            sys.stderr.write(f"\nflowalign {cmd}: interrupted{hint}\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
