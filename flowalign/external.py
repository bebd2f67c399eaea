"""External evaluators: images in the layout their official tool reads, and its per-image results back in.

GenEval (Ghosh et al. 2023, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image Alignment",
arXiv:2310.11513; REWARDS_AND_EVAL.md §2.8, §3.5) scores images with a Mask2Former detector (mmdet) and a CLIP
colour classifier that flowalign does not ship. So (REWARDS_AND_EVAL.md §3.6: "generates images in the layout the
official evaluator expects and runs it as an external tool"):

1. ``flowalign eval --prompts geneval --export geneval --out D`` also writes ``D/geneval/<i:05d>/metadata.jsonl``
   (prompt i's line of ``evaluation_metadata.jsonl``) and ``D/geneval/<i:05d>/samples/<k:04d>.png`` (image k), the
   layout of GenEval's README;
2. on a machine with GenEval installed: ``python evaluation/evaluate_images.py D/geneval --outfile
   D/geneval_results.jsonl --model-path <OBJECT_DETECTOR_FOLDER>``;
3. ``flowalign import-scores geneval D/geneval_results.jsonl --into D`` adds each image's ``correct`` as the score
   ``geneval`` (1 or 0) to ``D/results.jsonl`` and rebuilds ``summary.json`` (per task, overall = the mean over the six
   tasks as GenEval's ``summary_scores.py``, pass@k) and ``report.html``, so ``flowalign compare`` and the report treat
   it like any other reward.

    flowalign import-scores geneval RESULTS.jsonl --into EVAL_DIR
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from flowalign.errors import CommandParser, UserError, first_line

logger = logging.getLogger(__name__)

EXPORTS = ("geneval",)  # layouts `flowalign eval --export` writes
GENEVAL_DIR = "geneval"  # under an evaluation's --out
GENEVAL_SCORE = "geneval"  # the reward column an import adds
_GENEVAL_FILE = re.compile(r"(\d+)[/\\]samples[/\\](\d+)\.png$")  # .../<prompt>/samples/<image>.png


def check_geneval_records(records: Sequence[Mapping[str, Any]]) -> None:
    """One-line ``UserError`` unless every prompt record carries GenEval's metadata (``tag`` and ``include``), which its
    evaluator reads from each ``metadata.jsonl``: the ``geneval`` prompt set, or a file of the same format."""
    bad = [i for i, r in enumerate(records) if not isinstance(r.get("tag"), str) or not isinstance(r.get("include"), list)]
    if bad:
        raise UserError(f"--export geneval needs GenEval prompt records (tag, include, prompt), as --prompts geneval; "
                        f"{len(bad)} of {len(records)} prompts lack them (the first: {records[bad[0]].get('prompt')!r})")


class GenEvalExport:
    """Writes each evaluated image into GenEval's layout as it comes (``run_eval``'s ``on_images``).

    ``root/<i:05d>/metadata.jsonl`` holds prompt i's record as one JSON line, ``root/<i:05d>/samples/<k:04d>.png``
    image k (8-bit RGB, as every image a reward scores is quantised). A resumed evaluation re-writes only the batches it
    samples again; the others were exported before it stopped."""

    def __init__(self, root: str | Path, records: Sequence[Mapping[str, Any]]):
        self.root = Path(root)
        self.records = records

    def __call__(self, chunk: Sequence[tuple[int, int]], images: torch.Tensor, batch_records: Sequence[Mapping[str, Any]]) -> None:
        import json

        from PIL import Image

        from flowalign.io import atomic_write_bytes, atomic_write_text

        if images.dim() != 4:
            raise UserError("--export geneval takes images, not videos")
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)  # [B, 3, H, W]
        pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, 3]
        for j, (i, k) in enumerate(chunk):
            folder = self.root / f"{i:05d}"
            meta = folder / "metadata.jsonl"
            if not meta.is_file():
                atomic_write_text(meta, json.dumps(dict(self.records[i])) + "\n")
            buf = io.BytesIO()
            Image.fromarray(pixels[j]).save(buf, format="PNG")
            atomic_write_bytes(folder / "samples" / f"{k:04d}.png", buf.getvalue())


def geneval_job(filename: str) -> tuple[int, int]:
    """(prompt index, image index) of a GenEval result's ``filename`` (``.../<i>/samples/<k>.png``), or ValueError."""
    m = _GENEVAL_FILE.search(str(filename))
    if m is None:
        raise ValueError(f"{filename!r} is not a GenEval image path (<prompt>/samples/<image>.png)")
    return int(m.group(1)), int(m.group(2))


def import_geneval(eval_dir: str | Path, results_file: str | Path) -> dict:
    """Add GenEval's per-image ``correct`` to an evaluation (``flowalign eval --export geneval``) as the score
    ``geneval``; rewrite its results.jsonl, summary.json and report.html. Returns the new summary.

    Every image of the evaluation must have exactly one GenEval result with the same prompt, and every scored file
    that exists on this machine must be byte for byte this export's image (GenEval may run elsewhere, on a copy);
    else a one-line ``UserError`` and nothing is written: results of another export, or of part of one, cannot be
    mixed in."""
    import hashlib
    import json

    from flowalign.evaluate import summarize, summarize_pass_at_k
    from flowalign.io import atomic_write_text, read_jsonl
    from flowalign.report import read_summary, write_report

    d, src = Path(eval_dir), Path(results_file)
    if not (d / "results.jsonl").is_file() or not (d / "summary.json").is_file():
        raise UserError(f"--into {str(d)!r} is not an evaluation directory (results.jsonl, summary.json); pass the "
                        f"--out of the `flowalign eval --export geneval` run")
    if not src.is_file():
        raise UserError(f"GenEval results {str(src)!r} not found; write them with GenEval's evaluation/evaluate_images.py "
                        f"{d / GENEVAL_DIR} --outfile {src}")
    try:
        ours = read_jsonl(d / "results.jsonl")
        theirs = read_jsonl(src)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the results ({first_line(err)})") from None
    summary = read_summary(d / "summary.json")
    scores: dict[tuple[int, int], float] = {}
    prompts: dict[tuple[int, int], Any] = {}
    files: dict[tuple[int, int], Path] = {}
    for n, r in enumerate(theirs, 1):
        if not isinstance(r, dict) or "filename" not in r or not isinstance(r.get("correct"), bool):
            raise UserError(f"{src}:{n}: not a GenEval result (filename, correct); pass the --outfile of "
                            f"evaluation/evaluate_images.py")
        try:
            job = geneval_job(r["filename"])
        except ValueError as err:
            raise UserError(f"{src}:{n}: {err}") from None
        if job in scores:
            raise UserError(f"{src}:{n}: image {job[1]} of prompt {job[0]} is scored twice; evaluate each export once")
        scores[job], prompts[job], files[job] = float(r["correct"]), r.get("prompt"), Path(str(r["filename"]))
    jobs = {(int(r["prompt_index"]), int(r["sample"])): r for r in ours}
    missing, extra = sorted(jobs.keys() - scores.keys()), sorted(scores.keys() - jobs.keys())
    if missing or extra:
        raise UserError(f"{src} scores {len(scores)} images, the evaluation in {d} holds {len(jobs)} ({len(missing)} "
                        f"without a GenEval result, {len(extra)} not in the evaluation); run GenEval on the whole "
                        f"{d / GENEVAL_DIR}")
    wrong = [j for j in jobs if prompts[j] is not None and prompts[j] != jobs[j].get("prompt")]
    if wrong:
        i, k = wrong[0]
        raise UserError(f"{src}: image {k} of prompt {i} is scored for {prompts[(i, k)]!r}, but the evaluation sampled "
                        f"{jobs[(i, k)].get('prompt')!r}: these are results of another export")
    for job, scored in files.items():  # images the evaluator read that are here: they must be this export's
        if scored.is_file():
            ours = d / GENEVAL_DIR / f"{job[0]:05d}" / "samples" / f"{job[1]:04d}.png"
            if not ours.is_file() or scored.read_bytes() != ours.read_bytes():
                raise UserError(f"{src} scored {scored}, which is not this evaluation's image {ours}: these are results "
                                f"of another export (same prompts, other images)")
    for job, r in jobs.items():
        r[GENEVAL_SCORE] = scores[job]
    records = sorted(jobs.values(), key=lambda r: (r["prompt_index"], r["sample"]))
    settings = summary.get("settings") if isinstance(summary.get("settings"), dict) else {}
    names = [*[n for n in summary.get("overall", {}) if n != GENEVAL_SCORE], GENEVAL_SCORE]
    overall = settings.get("overall", "groups")
    new = summarize(records, names, overall=overall)
    passk = summarize_pass_at_k(records, names, overall=overall)
    if passk:
        new["pass_at_k"] = passk
    settings["external_scores"] = {**settings.get("external_scores", {}), GENEVAL_SCORE: {
        "tool": "GenEval evaluation/evaluate_images.py (djghosh13/geneval)", "results": str(src),
        "sha256": hashlib.sha256(src.read_bytes()).hexdigest()}}
    new["settings"] = settings
    atomic_write_text(d / "results.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_text(d / "summary.json", json.dumps(new, indent=2, default=str))
    write_report(d)
    return new


def cli_main(argv: Sequence[str]) -> int:
    p = CommandParser(prog="flowalign import-scores",
                      description="Add an external evaluator's per-image results to a `flowalign eval` directory "
                                  "(GenEval: after `flowalign eval --prompts geneval --export geneval`).")
    p.add_argument("tool", choices=EXPORTS, help="the evaluator that wrote RESULTS")
    p.add_argument("results", help="its per-image results, e.g. the --outfile of GenEval's evaluation/evaluate_images.py")
    p.add_argument("--into", required=True, help="the evaluation directory (the --out of `flowalign eval --export`)")
    args = p.parse_args(list(argv))
    summ = import_geneval(args.into, args.results)
    for task, vals in summ["per_task"].items():
        logger.info("%-14s %s=%.3f", task, GENEVAL_SCORE, vals.get(GENEVAL_SCORE, float("nan")))
    logger.info("overall        %s=%.3f (GenEval overall: the mean over tasks)", GENEVAL_SCORE,
                summ["overall"][GENEVAL_SCORE])
    return 0
