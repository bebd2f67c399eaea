"""External evaluators: images in the layout their official tool reads, and its per-image results back in.

GenEval below; T2I-CompBench (``--export t2i-compbench``: ``D/t2i-compbench/samples/<prompt>_<n:06d>.png``, then
``flowalign import-scores t2i-compbench VQA_RESULT.json --into D --name blip_vqa``) and VBench (video models,
``--export vbench``: ``D/vbench/<prompt>-<k>.mp4``, then ``flowalign import-scores vbench
<name>_eval_results.json --into D``, one column ``vbench_<dimension>`` per dimension) work the same way, see
``T2ICompBenchExport``, ``VBenchExport`` and docs/benchmarks.md.

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
    flowalign import-scores t2i-compbench VQA_RESULT.json --into EVAL_DIR --name NAME
    flowalign import-scores vbench RESULTS_eval_results.json --into EVAL_DIR
"""

from __future__ import annotations

import io
import logging
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from flowalign.errors import CommandParser, UserError, first_line

logger = logging.getLogger(__name__)

EXPORTS = ("geneval", "t2i-compbench", "hpsv2", "vbench")  # layouts `flowalign eval --export` writes
VIDEO_EXPORTS = ("vbench",)  # of those, the ones that take videos (the others take images)
IMPORTS = ("geneval", "t2i-compbench", "vbench")  # evaluators whose per-image results `flowalign import-scores` reads
GENEVAL_DIR = "geneval"  # under an evaluation's --out
T2I_DIR = "t2i-compbench"  # under an evaluation's --out: T2I_DIR/samples/<prompt>_<n:06d>.png
HPSV2_DIR = "hpsv2"  # under an evaluation's --out: HPSV2_DIR/<style>/<index:05d>.jpg
VBENCH_DIR = "vbench"  # under an evaluation's --out: VBENCH_DIR/<prompt>-<k>.mp4
VBENCH_VIDEOS = 5  # videos per prompt: VBench's standard mode reads exactly <prompt>-0.mp4 ... <prompt>-4.mp4
VBENCH_SCORE = "vbench_"  # an import adds the column vbench_<dimension> per dimension
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

        from flowalign.io import atomic_write_bytes, atomic_write_text

        for j, (i, k) in enumerate(chunk):
            folder = self.root / f"{i:05d}"
            meta = folder / "metadata.jsonl"
            if not meta.is_file():
                atomic_write_text(meta, json.dumps(dict(self.records[i])) + "\n")
            atomic_write_bytes(folder / "samples" / f"{k:04d}.png", _png(images[j]))


def check_t2i_records(records: Sequence[Mapping[str, Any]]) -> None:
    """One-line ``UserError`` unless every prompt can be a T2I-CompBench file name: its evaluators read the prompt back
    as the text before the first '_' of ``<prompt>_<n>.png``, so a prompt must hold no '_' or path separator and fit a
    file name (the vendored ``t2i-compbench-*`` sets do)."""
    for r in records:
        text = str(r.get("prompt", ""))
        if (any(c in text for c in "_/\\\0") or ".png" in text or len(text.encode("utf-8")) > 240
                or not text.strip()):
            raise UserError(f"--export t2i-compbench: prompt {text[:80]!r} cannot be a T2I-CompBench file name (no '_', "
                            f"'/', '\\' or '.png', at most 240 bytes); use the t2i-compbench-* prompt sets")


class T2ICompBenchExport:
    """Writes each evaluated image as ``root/samples/<prompt>_<n:06d>.png`` (T2I-CompBench's layout; Huang et al. 2023,
    "T2I-CompBench", arXiv:2307.06350), with n = i·seeds + k running over all images from 0.

    Its evaluators (BLIP-VQA, UniDet, CLIPScore) read ``samples/`` of the directory they are given, take the prompt
    from the file name and number their results by n: BLIP-VQA and CLIPScore by the position in the files sorted by
    n, UniDet by n itself; with n contiguous from 0 both are n, which ``import_t2i_compbench`` maps back to (i, k)."""

    def __init__(self, root: str | Path, records: Sequence[Mapping[str, Any]], seeds_per_prompt: int):
        self.root, self.records, self.seeds = Path(root), records, int(seeds_per_prompt)

    def __call__(self, chunk: Sequence[tuple[int, int]], images: torch.Tensor, batch_records: Sequence[Mapping[str, Any]]) -> None:
        from flowalign.io import atomic_write_bytes

        for j, (i, k) in enumerate(chunk):
            name = f"{self.records[i]['prompt']}_{i * self.seeds + k:06d}.png"
            atomic_write_bytes(self.root / "samples" / name, _png(images[j]))


def check_hpsv2_records(records: Sequence[Mapping[str, Any]], seeds_per_prompt: int) -> None:
    """One-line ``UserError`` unless the prompts are the HPSv2 benchmark's (``data.load_hpd_benchmark``: a directory of
    the four style files) sampled once each, as its evaluator reads one image per prompt."""
    if not all("style_index" in r and "task" in r for r in records):
        raise UserError("--export hpsv2 needs the HPSv2 benchmark's prompts: --prompts DIR, the directory of HPDv2's "
                        "benchmark/ (anime.json, concept-art.json, paintings.json, photo.json)")
    if seeds_per_prompt != 1:
        raise UserError(f"--export hpsv2 writes one image per prompt, as its evaluator reads; pass --seeds 1 "
                        f"(got {seeds_per_prompt})")
    if not hpd_complete(records):  # HPSv2's loader would silently score the next image for a missing one
        raise UserError("--export hpsv2 needs every prompt of each style (HPSv2's evaluator reads <style>/00000.jpg "
                        "onwards and silently skips a missing file); drop --max-prompts")


def hpd_complete(records: Sequence[Mapping[str, Any]]) -> bool:
    """Whether HPSv2 benchmark records hold each style's prompts 0..n-1, all of them, in order (no subset)."""
    seen: dict[str, list[int]] = {}
    for r in records:
        seen.setdefault(str(r.get("task")), []).append(int(r.get("style_index", -1)))
    return bool(seen) and all(v == list(range(len(v))) for v in seen.values())


class HPSv2Export:
    """Writes each evaluated image as ``root/<style>/<index:05d>.jpg`` (JPEG, quality 95), the layout of the HPSv2
    benchmark's images (REWARDS_AND_EVAL.md §3.3), which HPSv2's ``evaluate(mode="benchmark")`` scores against the
    same style files."""

    def __init__(self, root: str | Path, records: Sequence[Mapping[str, Any]]):
        self.root, self.records = Path(root), records

    def __call__(self, chunk: Sequence[tuple[int, int]], images: torch.Tensor, batch_records: Sequence[Mapping[str, Any]]) -> None:
        from flowalign.io import atomic_write_bytes

        for j, (i, _) in enumerate(chunk):
            rec = self.records[i]
            atomic_write_bytes(self.root / str(rec["task"]) / f"{int(rec['style_index']):05d}.jpg",
                               _encode(images[j], "JPEG", quality=95))


def _png(image: torch.Tensor) -> bytes:
    """One [3, H, W] image in [0, 1] as 8-bit RGB PNG bytes."""
    return _encode(image, "PNG")


def _encode(image: torch.Tensor, fmt: str, **options: Any) -> bytes:
    """One [3, H, W] image in [0, 1] as 8-bit RGB bytes of ``fmt`` (PIL's format name)."""
    from PIL import Image

    if image.dim() != 3:
        raise UserError("--export takes images, not videos")
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()  # [H, W, 3]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **options)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------------ VBench
# VBench (Huang et al. 2024, "VBench: Comprehensive Benchmark Suite for Video Generative Models", arXiv:2311.17982;
# REWARDS_AND_EVAL.md §3.8) scores videos with many external models (DINO, CLIP, RAFT, AMT, MUSIQ, GRiT, ViCLIP, UMT)
# that flowalign does not ship. Its prompts/README.md: one flat folder of `<prompt>-<index>.mp4`, 5 videos per prompt
# (prompt = the prompt file's line stripped), written as H.264; its standard mode reads exactly indices 0..4 of the
# prompts of each dimension's list and writes `<name>_eval_results.json`: {dimension: [aggregate, [{"video_path",
# "video_results", ...}, ...]]}.

# a file name's 255 bytes, less the 14 that io.atomic_write_bytes' temporary name adds ("." before, ".XXXXXXXX.tmp" after)
_VBENCH_NAME_BYTES = 255 - 14


def vbench_file(prompt: str, k: int) -> str:
    """The file name VBench reads for video ``k`` of ``prompt``: ``<prompt>-<k>.mp4``, the prompt stripped as VBench
    strips its prompt files' lines."""
    return f"{prompt.strip()}-{k}.mp4"


def check_vbench_export(records: Sequence[Mapping[str, Any]], seeds_per_prompt: int,
                        source: str = "--export vbench") -> None:
    """One-line ``UserError`` unless ``--export vbench`` can write these prompts' videos where VBench reads them:
    PyAV with the libx264 encoder is installed, there are exactly ``VBENCH_VIDEOS`` videos per prompt, and every
    prompt can be a file name (not empty, no '/', '\\', NUL or control character, ``<prompt>-<k>.mp4`` at most
    241 bytes: the 255 of a file name less the export's temporary name). ``source`` names what asked for the export
    in the messages (``--benchmark vbench`` implies it)."""
    try:
        import av

        av.codec.Codec("libx264", "w")
    except ImportError:
        raise UserError("--export vbench writes MP4 videos with PyAV, which is not installed: pip install av (or "
                        "pip install 'flowalign[video]')") from None
    except Exception as err:  # noqa: BLE001  (PyAV's own error types differ between versions)
        raise UserError(f"--export vbench needs PyAV's libx264 (H.264) encoder, which this PyAV lacks "
                        f"({first_line(err)}); pip install --force-reinstall av") from None
    if seeds_per_prompt != VBENCH_VIDEOS:
        raise UserError(f"{source} writes {VBENCH_VIDEOS} videos per prompt, the <prompt>-0.mp4 ... "
                        f"<prompt>-{VBENCH_VIDEOS - 1}.mp4 VBench reads (no more, no fewer); pass --seeds "
                        f"{VBENCH_VIDEOS} (got {seeds_per_prompt})")
    for r in records:
        text = str(r.get("prompt", ""))
        name = vbench_file(text, VBENCH_VIDEOS - 1)
        if (not text.strip() or any(c in text for c in "/\\") or any(ord(c) < 32 or ord(c) == 127 for c in text)
                or len(name.encode("utf-8")) > _VBENCH_NAME_BYTES):
            raise UserError(f"--export vbench: prompt {text[:80]!r} cannot be a file name (VBench names each video "
                            f"<prompt>-<k>.mp4: no '/', '\\', NUL or control character, not empty, at most "
                            f"{_VBENCH_NAME_BYTES} bytes with the suffix)")


def unique_vbench_prompts(records: Sequence[Any]) -> tuple[list, int]:
    """``records`` (``data.PromptRecord``) with each VBench video name (the prompt stripped) kept once, at its first
    occurrence, and how many repeats were dropped. VBench names videos by prompt, so a repeated prompt (two of
    ``all_dimension.txt``'s, listed under two dimensions) would write the same five files twice; sampled once, its
    videos are scored for every dimension that lists it. A kept record of a repeated prompt gets the metadata
    ``repeats`` (its number of records), which results.jsonl then carries."""
    from flowalign.data import PromptRecord

    counts: dict[str, int] = {}
    for r in records:
        counts[r.prompt.strip()] = counts.get(r.prompt.strip(), 0) + 1
    out, seen = [], set()
    for r in records:
        key = r.prompt.strip()
        if key in seen:
            continue
        seen.add(key)
        out.append(r if counts[key] == 1 else PromptRecord(r.prompt, {**r.metadata, "repeats": counts[key]}))
    return out, len(records) - len(out)


class VBenchExport:
    """Writes each evaluated video as ``root/<prompt>-<k>.mp4`` (``vbench_file``), VBench's layout: H.264 (libx264,
    default settings), yuv420p, at the model's frame rate, as VBench's sampling recipe writes with
    ``torchvision.io.write_video``; each file atomically. Needs prompts that ``check_vbench_export`` accepts, each
    once (``unique_vbench_prompts``)."""

    def __init__(self, root: str | Path, records: Sequence[Mapping[str, Any]], fps: Any = None,
                 size: Mapping[str, int] | None = None):
        from flowalign.report import DEFAULT_FPS

        self.root, self.records = Path(root), records
        self.fps = DEFAULT_FPS if fps is None else float(fps)  # as the GIF grids play (report.save_video_grid)
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise UserError(f"--export vbench: the model's fps must be a finite number > 0, got {fps!r}")
        odd = {k: v for k, v in (size or {}).items() if k in ("height", "width") and int(v) % 2}
        if odd:  # yuv420p stores colour at half resolution
            raise UserError(f"--export vbench encodes yuv420p H.264, which needs an even height and width; the model "
                            f"makes {odd}")

    def __call__(self, chunk: Sequence[tuple[int, int]], images: torch.Tensor, batch_records: Sequence[Mapping[str, Any]]) -> None:
        from flowalign.io import atomic_write_bytes

        for j, (i, k) in enumerate(chunk):
            name = vbench_file(str(self.records[i]["prompt"]), k)
            atomic_write_bytes(self.root / name, mp4_bytes(images[j], self.fps))


def mp4_bytes(video: torch.Tensor, fps: float) -> bytes:
    """One video [F, 3, H, W] in [0, 1] as MP4 bytes: 8-bit RGB (quantised as every image a reward scores) encoded
    with libx264 at its default settings into yuv420p, ``fps`` frames a second."""
    from fractions import Fraction

    import av

    if video.dim() != 4:
        raise UserError("--export vbench takes videos, not images")
    frames = (video.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)  # [F, 3, H, W]
    frames = frames.permute(0, 2, 3, 1).cpu().numpy()  # [F, H, W, 3]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return buf.getvalue()


def geneval_job(filename: str) -> tuple[int, int]:
    """(prompt index, image index) of a GenEval result's ``filename`` (``.../<i>/samples/<k>.png``), or ValueError."""
    m = _GENEVAL_FILE.search(str(filename))
    if m is None:
        raise ValueError(f"{filename!r} is not a GenEval image path (<prompt>/samples/<image>.png)")
    return int(m.group(1)), int(m.group(2))


def _read_evaluation(eval_dir: str | Path, results_file: str | Path, what: str, how: str) -> tuple:
    """(directory, results path, its per-image records keyed by (prompt index, sample), summary) of an evaluation
    to import into, or a one-line ``UserError``."""
    from flowalign.io import read_jsonl
    from flowalign.report import read_summary

    d, src = Path(eval_dir), Path(results_file)
    if not (d / "results.jsonl").is_file() or not (d / "summary.json").is_file():
        raise UserError(f"--into {str(d)!r} is not an evaluation directory (results.jsonl, summary.json); pass the "
                        f"--out of the `flowalign eval --export ...` run")
    if src.is_dir():
        raise UserError(f"{what} results {str(src)!r} is a directory; pass the results file in it, written by {how}")
    if not src.is_file():
        raise UserError(f"{what} results {str(src)!r} not found; write them with {how}")
    try:
        ours = read_jsonl(d / "results.jsonl")
        jobs = {(int(r["prompt_index"]), int(r["sample"])): r for r in ours}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot read {d / 'results.jsonl'} as an evaluation's records ({first_line(err)}); re-run "
                        f"the evaluation") from None
    return d, src, jobs, read_summary(d / "summary.json")


def _check_name(name: str, jobs: Mapping, settings: Mapping) -> None:
    """A new score column may not overwrite what the records already hold (prompt, prompt_index, sample, seed, the
    prompt's metadata such as task, the evaluation's rewards); an earlier import of the same name is replaced."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name or ""):
        raise UserError(f"--name {name!r} must be a score name (letters, digits, '_'), e.g. blip_vqa")
    held = {k for r in jobs.values() for k in r} - set(settings.get("external_scores") or {})
    if name in held:
        raise UserError(f"--name {name!r} is already a field of the evaluation's records ({', '.join(sorted(held))}); "
                        f"pick another name")


def _check_coverage(src: Path, d: Path, jobs: Mapping, scores: Mapping, what: str, where: Path) -> None:
    missing, extra = sorted(jobs.keys() - scores.keys()), sorted(scores.keys() - jobs.keys())
    if missing or extra:
        raise UserError(f"{src} scores {len(scores)} images, the evaluation in {d} holds {len(jobs)} ({len(missing)} "
                        f"without a {what} result, {len(extra)} not in the evaluation); run {what} on the whole {where}")


def _write_scores(d: Path, src: Path, jobs: Mapping, scores: Mapping, summary: dict, name: str, tool: str,
                  scorer: str = "") -> dict:
    """Add ``scores[job]`` to every record as the column ``name``; rewrite results.jsonl, summary.json (per task,
    overall in the evaluation's own convention, pass@k) and report.html. Returns the new summary."""
    return _write_columns(d, src, jobs, {name: scores}, summary, tool, scorer=scorer)


def _write_columns(d: Path, src: Path, jobs: Mapping, columns: Mapping[str, Mapping], summary: dict, tool: str,
                   scorer: str = "", info: Mapping[str, Mapping[str, Any]] | None = None) -> dict:
    """Add each column ``name: {job: score}`` of ``columns`` to the records it scores (a record it does not score
    holds no such field, which ``summarize`` skips; an earlier import of the same name is replaced, on every record);
    record the results file (its absolute path, as the import's working directory does not stay) and its SHA-256
    under ``settings["external_scores"][name]`` with ``info[name]`` beside it; rewrite
    results.jsonl, summary.json (per task, overall in the evaluation's own convention, pass@k) and report.html.
    Returns the new summary."""
    import hashlib
    import json

    from flowalign.evaluate import summarize, summarize_pass_at_k
    from flowalign.io import atomic_write_text
    from flowalign.report import write_report

    for name, scores in columns.items():
        for job, r in jobs.items():
            r.pop(name, None)
            if job in scores:
                r[name] = scores[job]
    records = sorted(jobs.values(), key=lambda r: (r["prompt_index"], r["sample"]))
    settings = summary.get("settings") if isinstance(summary.get("settings"), dict) else {}
    names = [*[n for n in summary.get("overall", {}) if n not in columns], *columns]
    overall = settings.get("overall", "groups")
    new = summarize(records, names, overall=overall)
    passk = summarize_pass_at_k(records, names, overall=overall)
    if passk:
        new["pass_at_k"] = passk
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    settings["external_scores"] = {**settings.get("external_scores", {}), **{name: {
        "tool": tool, "results": str(src.resolve()), "sha256": digest, **((info or {}).get(name) or {})}
        for name in columns}}
    status = settings.get("benchmark")
    if isinstance(status, dict) and scorer and status.get("external") == scorer:  # scored by its own evaluator now
        status["scored"] = True
    new["settings"] = settings
    atomic_write_text(d / "results.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_text(d / "summary.json", json.dumps(new, indent=2, default=str))
    write_report(d)
    return new


def import_geneval(eval_dir: str | Path, results_file: str | Path) -> dict:
    """Add GenEval's per-image ``correct`` to an evaluation (``flowalign eval --export geneval``) as the score
    ``geneval``; rewrite its results.jsonl, summary.json and report.html. Returns the new summary.

    An evaluation not exported for GenEval (``settings["export"]``) has no images GenEval could have scored: refused
    in one line, as the other importers refuse theirs. Every image of the evaluation must have exactly one GenEval
    result with the same prompt, and every scored file that exists on this machine must be byte for byte this
    export's image (GenEval may run elsewhere, on a copy); else a one-line ``UserError`` and nothing is written:
    results of another export, or of part of one, cannot be mixed in."""
    from flowalign.io import read_jsonl

    # GenEval runs from its own repository: the hint names absolute paths, as `flowalign eval`'s does
    d, src, jobs, summary = _read_evaluation(eval_dir, results_file, "GenEval", "GenEval's "
                                             f"evaluation/evaluate_images.py {Path(eval_dir).resolve() / GENEVAL_DIR} "
                                             f"--outfile {Path(results_file).resolve()} --model-path "
                                             f"<OBJECT_DETECTOR_FOLDER>")
    settings = summary.get("settings") if isinstance(summary.get("settings"), dict) else {}
    if settings.get("export") != "geneval":  # no GenEval layout to have scored (nor to compare scored files with)
        raise UserError(f"{d} was not exported for GenEval; evaluate with `flowalign eval --prompts geneval "
                        f"--export geneval` (or --benchmark geneval)")
    try:
        theirs = read_jsonl(src, strict=True)
    except OSError as err:
        raise UserError(f"cannot read {src} ({first_line(err)})") from None
    except ValueError as err:  # not JSON lines (a JSON list or object over several lines, not text, ...)
        raise UserError(f"{src} is not GenEval's results (the JSON lines, one per image, that "
                        f"evaluation/evaluate_images.py writes to its --outfile): {first_line(err)}") from None
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
    _check_coverage(src, d, jobs, scores, "GenEval", d / GENEVAL_DIR)
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
    return _write_scores(d, src, jobs, scores, summary, GENEVAL_SCORE,
                         "GenEval evaluation/evaluate_images.py (djghosh13/geneval)", scorer="geneval")


def import_t2i_compbench(eval_dir: str | Path, results_file: str | Path, name: str) -> dict:
    """Add a T2I-CompBench evaluator's per-image scores (its ``vqa_result.json``: ``[{"question_id": n, "answer":
    score}, ...]``, e.g. ``annotation_blip/vqa_result.json``) to an evaluation exported with ``--export t2i-compbench``
    as the score ``name`` (e.g. ``blip_vqa``); image n is image k of prompt i with n = i·seeds + k. Every image must
    have exactly one finite score, else a one-line ``UserError`` and nothing is written."""
    import json
    import math

    d, src, jobs, summary = _read_evaluation(eval_dir, results_file, "T2I-CompBench",
                                             f"T2I-CompBench's evaluator on {Path(eval_dir).resolve() / T2I_DIR}")
    settings = summary.get("settings") if isinstance(summary.get("settings"), dict) else {}
    _check_name(name, jobs, settings)
    seeds = settings.get("seeds_per_prompt")
    if settings.get("export") != "t2i-compbench" or not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise UserError(f"{d} was not exported for T2I-CompBench; evaluate with `flowalign eval --export t2i-compbench`")
    # the evaluators write their results inside the directory they scored: one under another export's is not ours
    ours = (d / T2I_DIR).resolve()
    theirs = next((a for a in src.resolve().parents if a.name == T2I_DIR), None)
    if theirs is not None and theirs != ours:
        raise UserError(f"{src} lies under {theirs}, another export than {ours}: these are results of other images")
    what = "T2I-CompBench's vqa_result.json (a JSON list of {question_id, answer})"
    try:
        data = json.loads(src.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"cannot read {src} ({first_line(err)})") from None
    except ValueError as err:  # not JSON (e.g. GenEval's JSON lines) or not text
        raise UserError(f"{src} is not {what}: {first_line(err)}; pass a vqa_result.json of its evaluators") from None
    if not isinstance(data, list):
        raise UserError(f"{src} is not {what}: it holds a JSON {_json_kind(data)}, not a list; pass a "
                        f"vqa_result.json of its evaluators")
    scores: dict[tuple[int, int], float] = {}
    for n, r in enumerate(data):
        try:
            qid, answer = r["question_id"], r["answer"]
            if not isinstance(qid, int) or isinstance(qid, bool) or isinstance(answer, bool) or qid < 0:
                raise TypeError
            value = float(answer)  # a number, or BLIP-VQA's '0.1234'
        except (TypeError, KeyError, ValueError):
            raise UserError(f"{src}: entry {n} is not a T2I-CompBench result (an integer question_id, a numeric "
                            f"answer); pass a vqa_result.json of its evaluators") from None
        if not math.isfinite(value):
            raise UserError(f"{src}: image {qid} is scored {r['answer']!r}, not a finite number")
        job = divmod(qid, seeds)
        if job in scores:
            raise UserError(f"{src}: image {qid} is scored twice; evaluate each export once")
        scores[job] = value
    _check_coverage(src, d, jobs, scores, "T2I-CompBench", d / T2I_DIR)
    return _write_scores(d, src, jobs, scores, summary, name, f"T2I-CompBench ({src.parent.name}/{src.name})")


def import_vbench(eval_dir: str | Path, results_file: str | Path) -> dict:
    """Add VBench's per-video results (its ``<name>_eval_results.json``: ``{dimension: [aggregate, [{"video_path",
    "video_results", ...}, ...]]}``) to an evaluation exported with ``--export vbench``: per dimension the column
    ``vbench_<dimension>`` on the records of the videos it scored (``video_path``'s file name ``<prompt>-<k>.mp4`` is
    video k of that prompt; true/false as 1/0). Each dimension scores its own prompt list only, so the other records
    get no value (``summarize`` skips them); VBench's own aggregate is kept in ``settings["external_scores"]``.
    Importing several results files (one per dimension) adds their columns; a dimension imported again is replaced.

    A file that is not VBench's results, a video this evaluation did not export, a video scored twice in one dimension,
    a score that is not a finite number or boolean, or a scored file that exists on this machine and is not byte for
    byte this export's video (VBench may run elsewhere, on a copy) is a one-line ``UserError``, and nothing is
    written. Rewrites results.jsonl, summary.json and report.html; returns the new summary."""
    import json

    d, src, jobs, summary = _read_evaluation(eval_dir, results_file, "VBench", f"VBench's evaluate.py "
                                             f"--videos_path {Path(eval_dir).resolve() / VBENCH_DIR} --dimension ...")
    settings = summary.get("settings") if isinstance(summary.get("settings"), dict) else {}
    if settings.get("export") != "vbench":
        raise UserError(f"{d} was not exported for VBench; evaluate a video model with `flowalign eval --export vbench`")
    videos = {vbench_file(str(r.get("prompt", "")), job[1]): job for job, r in jobs.items()}
    what = "pass the <name>_eval_results.json that VBench's evaluate.py writes in its --output_path"
    try:
        data = json.loads(src.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"cannot read {src} ({first_line(err)}); {what}") from None
    except ValueError as err:  # not JSON (e.g. GenEval's JSON lines) or not text
        raise UserError(f"{src} is not a VBench results file (a JSON object {{dimension: [score, per-video "
                        f"results]}}): {first_line(err)}; {what}") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"{src} is not a VBench results file ({{dimension: [score, per-video results]}}); {what}")
    columns: dict[str, dict[tuple[int, int], float]] = {}
    info: dict[str, dict[str, Any]] = {}
    same: dict[str, bool] = {}  # scored file -> whether it is this export's video (each file read once)
    for dim, entry in data.items():
        if (not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", str(dim)) or not isinstance(entry, list) or len(entry) != 2
                or not isinstance(entry[1], list) or _vbench_score(entry[0]) is None):
            raise UserError(f"{src}: {str(dim)[:60]!r} is not a VBench dimension's result ([aggregate score, "
                            f"[per-video results]]); {what}")
        col: dict[tuple[int, int], float] = {}
        for n, v in enumerate(entry[1]):
            if not isinstance(v, dict) or not isinstance(v.get("video_path"), str) or "video_results" not in v:
                raise UserError(f"{src}: {dim} entry {n} is not a VBench video result (video_path, video_results); "
                                f"{what}")
            base = re.split(r"[/\\]", v["video_path"])[-1]
            job = videos.get(base)
            if job is None:
                raise UserError(f"{src}: {dim} scores {base[:100]!r}, which is not a video of this evaluation "
                                f"({d / VBENCH_DIR}): these are results of another export")
            if job in col:
                raise UserError(f"{src}: {dim} scores {base[:100]!r} twice; evaluate each export once")
            value = _vbench_score(v["video_results"])
            if value is None:
                raise UserError(f"{src}: {dim} scores {base[:100]!r} with {str(v['video_results'])[:40]!r}, not a "
                                f"finite number or true/false")
            scored = v["video_path"]
            if scored not in same:
                same[scored] = _same_file(Path(scored), d / VBENCH_DIR / base)
            if not same[scored]:
                raise UserError(f"{src} scored {scored}, which is not this evaluation's video {d / VBENCH_DIR / base}: "
                                f"these are results of another export (same prompts, other videos)")
            col[job] = value
        name = VBENCH_SCORE + str(dim)
        _check_name(name, jobs, settings)
        columns[name] = col
        info[name] = {"vbench_aggregate": _vbench_score(entry[0]), "videos": len(col)}
    new = _write_columns(d, src, jobs, columns, summary, f"VBench ({src.name})", scorer="vbench", info=info)
    for name, col in columns.items():
        mean = sum(col.values()) / len(col) if col else float("nan")
        logger.info("%-32s VBench's aggregate %.4f, mean over its %d videos %.4f", name,
                    info[name]["vbench_aggregate"], len(col), mean)
    return new


def _json_kind(value: Any) -> str:
    """JSON's name for the kind of a parsed JSON ``value`` (object, list, string, number, boolean, null)."""
    kinds = ((bool, "boolean"), (dict, "object"), (list, "list"), (str, "string"), ((int, float), "number"))
    return next((name for t, name in kinds if isinstance(value, t)), "null")


def _vbench_score(value: Any) -> float | None:
    """A VBench score as a float (true/false as 1/0), or None when it is not a finite number or a boolean."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _same_file(scored: Path, ours: Path) -> bool:
    """Whether a file a scorer read is this export's ``ours``: true when it does not exist here (the scorer ran on
    another machine, on a copy), else when both hold the same bytes."""
    if not scored.is_file():
        return True
    return ours.is_file() and (scored.resolve() == ours.resolve() or scored.read_bytes() == ours.read_bytes())


def cli_main(argv: Sequence[str]) -> int:
    p = CommandParser(prog="flowalign import-scores",
                      description="Add an external evaluator's per-image results to a `flowalign eval` directory "
                                  "(GenEval: after `flowalign eval --prompts geneval --export geneval`; T2I-CompBench: "
                                  "after `flowalign eval --prompts t2i-compbench-<category> --export t2i-compbench`; "
                                  "VBench: after `flowalign eval --prompts vbench --seeds 5 --export vbench` of a "
                                  "video model).")
    p.add_argument("tool", choices=IMPORTS, help="the evaluator that wrote RESULTS (HPSv2's writes no per-image "
                                                 "results: flowalign's hpsv21 reward scores the same images)")
    p.add_argument("results", help="its per-image results, e.g. the --outfile of GenEval's evaluation/evaluate_images.py "
                                   "or VBench's <output_path>/<name>_eval_results.json")
    p.add_argument("--into", required=True, help="the evaluation directory (the --out of `flowalign eval --export`)")
    p.add_argument("--name", help="t2i-compbench: the score's name in results.jsonl, e.g. blip_vqa, unidet_spatial, "
                                  "clip_score (GenEval's is always 'geneval', VBench's vbench_<dimension>)")
    args = p.parse_args(list(argv))
    if args.tool == "geneval":
        if args.name not in (None, GENEVAL_SCORE):
            raise UserError(f"--name: GenEval's score is always called {GENEVAL_SCORE!r}")
        name, summ = GENEVAL_SCORE, import_geneval(args.into, args.results)
    elif args.tool == "vbench":
        if args.name is not None:
            raise UserError(f"--name: VBench's scores are always called {VBENCH_SCORE}<dimension>, one per dimension")
        name, summ = None, import_vbench(args.into, args.results)  # it logs each dimension
    else:
        if not args.name:
            raise UserError("--name is required for t2i-compbench: what the results measure, e.g. --name blip_vqa")
        name, summ = args.name, import_t2i_compbench(args.into, args.results, args.name)
    if name is not None:
        for task, vals in summ["per_task"].items():
            logger.info("%-14s %s=%.3f", task, name, vals.get(name, float("nan")))
        logger.info("overall        %s=%.3f", name, summ["overall"][name])
    status = summ["settings"].get("benchmark")
    if isinstance(status, dict):
        from flowalign.report import benchmark_line

        (logger.info if status.get("benchmark") else logger.warning)("%s", benchmark_line(status))
    return 0
