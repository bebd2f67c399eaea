"""Sampling images from a model (optional LoRA, chosen sampler) and image grids; ``flowalign sample``.

Each image's initial noise comes from its own generator seeded by its seed, so a (prompt, seed) pair gives
the same image whatever the batch it is drawn in: before/after grids compare like with like.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor

from flowalign.errors import CommandParser, Once, UserError, first_line
from flowalign.io import check_out_parent  # re-exported: the commands import it from here (it lives in io, a lower layer)
from flowalign.samplers import eta_schedule, sample

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def guidance(model, scale: Optional[float]) -> Iterator[None]:
    """Temporarily set the model's CFG scale (evaluation uses its own, quirk Q8)."""
    if scale is None:
        yield
        return
    prev = model.guidance_scale
    model.guidance_scale = float(scale)
    try:
        yield
    finally:
        model.guidance_scale = prev


@torch.no_grad()
def generate(model, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance_scale: Optional[float] = None,
             kernel: str = "euler", eta: float | Tensor = 0.0, batch_size: int = 64, progress: bool = False) -> Tensor:
    """Images [N, 3, H, W] (or [N, F, 3, H, W]) in [0, 1] for prompts[i] with seeds[i] (ODE by default; ``eta`` is
    one noise level for every step or a per-step [T] list, e.g. a calibrated ``flowalign calibrate`` file's)."""
    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must have the same length")
    sigmas = model.schedule(steps)  # [T+1]
    etas = eta_schedule(steps, eta)  # [T]
    out = []
    starts = range(0, len(prompts), batch_size)
    with guidance(model, guidance_scale):  # first: a model's warning about the scale comes before the progress bar
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="sampling", unit="batch")
        for s in starts:
            ps, ss = list(prompts[s:s + batch_size]), list(seeds[s:s + batch_size])
            uniq = list(dict.fromkeys(ps))
            cond = model.encode(uniq)
            idx = torch.tensor([uniq.index(p) for p in ps], device=model.device)
            x = torch.cat([model.init_noise(1, torch.Generator().manual_seed(int(sd))) for sd in ss])  # [n, *latent]
            if bool((etas > 0).any()):
                from flowalign.evaluate import step_noise_seed

                # SDE: one step-noise stream per image, seeded by its own seed, so the image does not depend on
                # its batch-mates or its place in the batch (one generator per batch would)
                final = torch.cat([
                    sample(model.velocity, x[i:i + 1], sigmas.to(model.device), cond, eta=etas.to(model.device),
                           kernel=kernel, cond_index=idx[i:i + 1],
                           generator=torch.Generator().manual_seed(step_noise_seed(int(sd)))).final
                    for i, sd in enumerate(ss)])  # [n, *latent]
            else:
                final = sample(model.velocity, x, sigmas.to(model.device), cond, eta=etas.to(model.device), kernel=kernel,
                               cond_index=idx, generator=None).final
            out.append(model.decode(final).float().cpu())
    return torch.cat(out)


def film_strip(videos: torch.Tensor, max_frames: int = 8) -> torch.Tensor:
    """Videos [N, F, 3, H, W] → images [N, 3, H, k·W]: k = min(F, max_frames) evenly spaced frames side by side, first
    and last included, so a grid cell shows the motion."""
    f = videos.shape[1]
    idx = torch.linspace(0, f - 1, min(f, max_frames)).round().long()  # [k]
    return torch.cat(list(videos[:, idx].unbind(1)), dim=-1)  # [N, 3, H, k·W]


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, labels: Optional[Sequence[str]] = None,
              fps: Optional[float] = None) -> Path:
    """Save samples as a PNG grid (``report.save_image_grid``). Videos [N, F, 3, H, W] become film strips of up to 8
    frames per tile, and the same grid is also written as a looping GIF beside the PNG (``path`` with ``.gif``) that
    plays at ``fps``: pass the video model's ``fps`` (Wan 16; None = ``report.DEFAULT_FPS``)."""
    from flowalign.report import save_image_grid, save_video_grid

    if images.dim() == 5:
        gif = save_video_grid(images, Path(path).with_suffix(".gif"), nrow=nrow, labels=labels, fps=fps)
        logger.info("wrote %s (%d frame%s)", gif, images.shape[1], "" if images.shape[1] == 1 else "s")
        images = film_strip(images)
    return save_image_grid(images, path, nrow=nrow, labels=labels)


def sample_grid(model, records, path: str | Path, *, steps: int, guidance: Optional[float] = None, seed: int = 0,
                seeds_per_prompt: int = 4, kernel: str = "euler", eta: float | Tensor = 0.0, batch_size: int = 64,
                progress: bool = False) -> Path:
    """A PNG grid: one row per prompt (records or strings), one column per seed; captions are the prompts.

    For a video model each tile is a film strip of up to 8 frames, and the same grid is also written as an animated
    GIF beside the PNG (``path`` with the suffix ``.gif``) that plays at the model's ``fps``. ``batch_size`` images
    share a model forward (memory and speed only: each image has its own noise), ``progress`` shows a bar over the
    batches."""
    prompts = [getattr(r, "prompt", r) for r in records]
    rows = [(p, seed + j) for p in prompts for j in range(seeds_per_prompt)]
    images = generate(model, [p for p, _ in rows], [s for _, s in rows], steps=steps, guidance_scale=guidance,
                      kernel=kernel, eta=eta, batch_size=batch_size, progress=progress)
    labels = [p if j == 0 else "" for p in prompts for j in range(seeds_per_prompt)]
    return save_grid(images, path, nrow=seeds_per_prompt, labels=labels, fps=getattr(model, "fps", None))


def default_prompt_set(family: Any, name: str) -> str:
    """The prompt set ``sample`` and ``steer`` use when given no prompts: the family's own benchmark
    (``default_prompts``, which ``flowalign eval`` evaluates by default), announced in one INFO line; a family with
    none (sd3, flux, wan) gets a one-line ``UserError`` with an example."""
    default = getattr(family, "default_prompts", None)
    if default is None:
        raise UserError(f"no prompts given, and --model {name} has no built-in prompt set; pass prompts as arguments "
                        "(e.g. \"a photo of a red apple\") or --prompt-file NAME_OR_PATH (e.g. --prompt-file parti)")
    logger.info("no prompts given: using the prompts of %s, the benchmark of --model %s (pass prompts or "
                "--prompt-file to choose)", default, name)
    return default


def check_lora_dir(path: str | Path, flag: str = "--lora") -> Path:
    """``path`` as a LoRA checkpoint directory whose weight file reads as LoRA tensors, or a one-line ``UserError``.

    Reads only the (small) LoRA file, so a command can refuse a bad ``--lora`` before it loads the model. A file
    without flowalign's stored LoRA config must be in the diffusers/peft layout (``models.lora.infer_config``).
    """
    from safetensors import SafetensorError

    from flowalign.models.lora import WEIGHT_NAME, infer_config, lora_dir_hint, read_lora

    lora = Path(path)
    if not (lora / WEIGHT_NAME).is_file():  # e.g. a run directory: its newest checkpoint, or a model's final/
        hint = lora_dir_hint(lora) or "pass a checkpoint directory, e.g. runs/NAME/checkpoints/step-N"
        raise UserError(f"{flag} {str(lora)!r}: no {WEIGHT_NAME} there; {hint}")
    try:
        sd, config = read_lora(lora)
    except (SafetensorError, OSError, ValueError) as err:  # garbage / truncated file, no LoRA tensors
        raise UserError(f"{flag} {str(lora)!r}: cannot read {WEIGHT_NAME} ({first_line(err)}); pass a checkpoint "
                        f"directory written by `flowalign train` or diffusers' save_lora_weights") from err
    if config is None:  # not written by flowalign: a diffusers/peft-format file loads too, another layout does not
        try:
            infer_config(sd, f"{flag} {str(lora)!r}")
        except ValueError as err:
            raise UserError(first_line(err)) from err
    return lora


def load_lora_checked(model, path: str | Path, flag: str = "--lora") -> None:
    """``model.load_lora(path)`` with a one-line ``UserError`` when the file does not fit the model."""
    from safetensors import SafetensorError

    lora = check_lora_dir(path, flag)
    try:
        model.load_lora(lora)
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as err:  # keys/shapes of another model
        raise UserError(f"{flag} {str(lora)!r} does not fit this model ({first_line(err)}); pass a LoRA trained on "
                        f"the same --model/--path") from err


def check_device(name: str, flag: str = "--device") -> torch.device:
    """``name`` as a ``torch.device`` that exists here, or a one-line ``UserError`` naming it."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"{flag} {name!r} is not a torch device; pass e.g. cpu, cuda or cuda:0") from None
    from flowalign.dist import device_unavailable

    why = device_unavailable(dev)
    if why:
        raise UserError(f"{flag} {name!r}: {why}; pass {flag} cpu")
    return dev


def check_new_dir(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as an output directory that is new or empty (and creatable), or a one-line ``UserError``: nothing of
    an earlier run is overwritten."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {str(out)!r} is a file; pass a new or empty directory")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"output directory {out} is not empty; choose a new {flag}")
    check_out_parent(out, flag)
    return out


def check_out_dir(path: str | Path, resume: bool, journal: str, flag: str = "--out") -> Path:
    """The output directory of a resumable command (``eval``, ``steer``): with ``resume``, one holding an interrupted
    run's ``journal`` file; without, a new or empty one (``check_new_dir``), and one holding a journal is refused with
    a hint to resume it. A one-line ``UserError`` otherwise. The journals of a multi-process run's other ranks
    (``<stem>.rank<r><suffix>``, ``evaluate.partial_path``) count as well: a run killed before rank 0 wrote its own
    still resumes."""
    out = Path(path)
    name = Path(journal)
    held = [q.name for q in [out / journal, *sorted(out.glob(f"{name.stem}.rank*{name.suffix}"))] if q.is_file()]
    if resume:
        if not held:
            finished = (out / "summary.json").is_file()
            raise UserError(f"--resume: {out} holds no interrupted run (no {journal})"
                            + ("; it finished already" if finished else "; run without --resume"))
        check_out_parent(out, flag)  # the directory itself must still be writable
        return out
    if held:
        raise UserError(f"{out} holds an interrupted run ({', '.join(held)}); continue it with --resume (same "
                        f"arguments), or choose a new {flag}")
    return check_new_dir(out, flag)


def check_guidance(value: Optional[float], flag: str = "--guidance") -> Optional[float]:
    """``value`` (a CFG scale; None = the model's own) if it is a finite number >= 0, else a one-line ``UserError``
    starting with ``flag``: NaN, inf or a negative scale would go straight into every model forward."""
    if value is None:
        return None
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag} must be a finite number >= 0 (1 = no CFG), got {value!r}") from None
    if not (math.isfinite(scale) and scale >= 0):
        raise UserError(f"{flag} must be a finite number >= 0 (1 = no CFG), got {value}")
    return scale


def check_seed(value: int, flag: str = "--seed") -> int:
    """``value`` if it is a usable base seed, else a one-line ``UserError``: the per-image seeds derived from it
    (e.g. ``seed·1_000_003 + …``) must fit ``torch.Generator.manual_seed``, or sampling fails after the model loaded."""
    if not -(1 << 32) < value < (1 << 32):
        raise UserError(f"{flag} must be between -2**32 and 2**32 (exclusive), got {value}")
    return value


def check_max_prompts(value: int, flag: str = "--max-prompts") -> int:
    """``value`` if it is >= 0 (0 = every prompt), else a one-line ``UserError`` (a negative count silently meant all)."""
    if value < 0:
        raise UserError(f"{flag} must be >= 0 (0 = every prompt), got {value}")
    return value


def check_prompt_args(prompts: Sequence[str]) -> list[str]:
    """Prompts given as arguments, or a one-line ``UserError`` for an empty one: it would be sampled unconditionally
    (prompt files refuse empty prompts the same way)."""
    for i, pr in enumerate(prompts, 1):
        if not pr.strip():
            raise UserError(f"prompt argument {i} is empty ({pr!r}); pass a non-empty prompt or drop it")
    return list(prompts)


def resolve_steps(model, steps: Optional[int]) -> int:
    """``steps`` (the ``--steps`` of sample, eval and steer) when given, else the model's own default: its
    ``default_steps`` (the diffusers pipeline's for sd3 and flux, 28, and wan, 50; the config's ``sample_steps`` for the
    shapes models, 12)."""
    if steps is not None:
        return int(steps)
    default = getattr(model, "default_steps", None)
    if default is None:  # a family registered without one: no number is better than a made-up one
        raise UserError(f"the {type(model).__name__} model declares no default number of sampling steps; pass --steps N")
    return int(default)


def check_positive(**values: Optional[int]) -> None:
    """One-line ``UserError`` for the first ``--flag`` (keyword, ``_`` for ``-``) that is set and below 1, or, for
    ``steps``, above ``config.MAX_STEPS``, or, for ``seeds``, above ``config.MAX_SEEDS``."""
    from flowalign.config import check_max_seeds, check_max_steps

    for name, value in values.items():
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if name == "steps":
            check_max_steps(value)
        if name == "seeds":
            check_max_seeds(value)


def cli_main(argv: Sequence[str]) -> int:

    from flowalign import data as D
    from flowalign.evaluate import add_model_arg, guidance_with_model_args, parse_model_args
    from flowalign.models import load_model
    from flowalign.samplers import KERNELS

    p = CommandParser(prog="flowalign sample", description="Sample an image grid from a model.")
    p.add_argument("prompts", nargs="*", help="prompts (or use --prompt-file; neither: the model's own benchmark "
                   "prompts, shapes-bench for shapes and shapes-motion-bench for shapes_video)")
    p.add_argument("--prompt-file", "--prompts", dest="prompt_file",
                   help="a built-in prompt set name or a .txt/.jsonl file (--prompts: the same, as eval names it)")
    p.add_argument("--max-prompts", type=int, default=None, help="an evenly spaced subset of N prompts: of "
                   "--prompt-file's (default 8) or of the prompts given as arguments (default all); 0 = all")
    p.add_argument("--model", default="shapes", help="model family (shapes, shapes_video, sd3, flux, wan)")
    p.add_argument("--path", default="", help="weights directory or hub id ('' = the family default)")
    p.add_argument("--lora", action=Once, once_hint="one LoRA is applied; merge them first or pass one", help="a LoRA directory (pytorch_lora_weights.safetensors), e.g. a run's checkpoints/step-N "
                   "or one written by diffusers' save_lora_weights")
    add_model_arg(p)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's own: 28 for sd3 "
                   "and flux, 50 for wan, the config's sample_steps for shapes, 12)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    p.add_argument("--kernel", default="euler", help=f"step kernel: {' | '.join(KERNELS)}")
    p.add_argument("--eta", type=float, default=None, help="noise level of the kernel (default 0.7 for every kernel "
                   "but euler, as steer's; 0 for euler, the ODE)")
    p.add_argument("--eta-file", default=None, metavar="JSON",
                   help="per-step noise levels from `flowalign calibrate` (its kernel, and its step count unless "
                        "--steps is given), to look at what calibrated noise draws; instead of --eta")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt (seeds seed..seed+n-1)")
    p.add_argument("--seed", type=int, default=0, help="first noise seed: image j of every prompt starts from seed + j")
    p.add_argument("--batch-size", type=int, default=32, help="images per model forward (memory and speed; each "
                   "image has its own noise, so the grid does not depend on it)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--out", default="samples.png", help="output PNG grid (a video model also writes the grid as an "
                                                        "animated GIF beside it: the same name with .gif); an existing "
                                                        "file of that name is replaced")
    args = p.parse_args(list(argv))
    # every argument is checked before the model loads and before anything is written
    model_kwargs = parse_model_args(args.model, args.model_arg)
    args.guidance = guidance_with_model_args(args.guidance, model_kwargs)
    check_positive(seeds=args.seeds, steps=args.steps, batch_size=args.batch_size)
    if args.max_prompts is not None:
        check_max_prompts(args.max_prompts)
    check_seed(args.seed)
    check_guidance(args.guidance)
    device = check_device(args.device)
    if args.kernel not in KERNELS:
        import difflib

        close = difflib.get_close_matches(args.kernel, list(KERNELS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"--kernel {args.kernel!r} is not a kernel (choose one of {', '.join(KERNELS)}){hint}")
    eta_given = args.eta is not None
    if eta_given and args.eta_file:  # before the kernel checks: the file fixes the kernel, so they would mislead
        raise UserError(f"pass --eta {args.eta:g} or --eta-file {args.eta_file!r}, not both")
    if not eta_given:  # a stochastic kernel at eta 0 is Euler: `--kernel flow_sde` alone drew the ODE's grid
        args.eta = 0.7 if args.kernel != "euler" and not args.eta_file else 0.0
    if not (math.isfinite(args.eta) and args.eta >= 0):  # NaN/inf noise gives a NaN (black) grid, no error
        raise UserError(f"--eta must be a finite number >= 0, got {args.eta}")
    if args.eta > 0 and args.kernel == "euler":  # the registry's one ODE kernel; every other one draws noise
        stochastic = [k for k in KERNELS if k != "euler"]
        raise UserError(f"--eta > 0 needs a stochastic kernel: --kernel {', '.join(stochastic[:-1])} or "
                        f"{stochastic[-1]}")
    eta: float | torch.Tensor = args.eta
    eta_data: dict = {}
    if args.eta_file:  # the calibrated per-step noise: its kernel and step count unless given
        from flowalign.calibrate import read_eta_file

        explicit = args.kernel if args.kernel != "euler" else None  # euler (the default) draws no noise to scale
        etas, eta_data = read_eta_file(args.eta_file, args.steps, explicit, cli=True)
        args.kernel = eta_data.get("kernel") or explicit
        if args.kernel is None or args.kernel not in KERNELS:
            raise UserError(f"--eta-file {args.eta_file!r} names no kernel of this version "
                            f"({eta_data.get('kernel')!r}); pass --kernel, e.g. --kernel dance_sde")
        args.steps = len(etas) if args.steps is None else args.steps
        eta = torch.tensor(etas, dtype=torch.float32)  # [T]
    if Path(args.out).is_dir():
        raise UserError(f"--out {args.out!r} is a directory; pass the path of a PNG file, e.g. {Path(args.out) / 'samples.png'}")
    check_out_parent(args.out)
    if Path(args.out).suffix.lower() != ".png":  # the grid is written as PNG bytes whatever the name says
        raise UserError(f"--out {args.out!r}: the grid is a PNG image; give the file a .png name")
    from flowalign.models import resolve

    gif = Path(args.out).with_suffix(".gif")  # a video model also writes the grid there (save_grid), after sampling
    if getattr(resolve(args.model), "output_kind", "image") == "video" and gif.is_dir():
        raise UserError(f"--out {args.out!r}: a video model also writes the grid as {str(gif)!r}, which is a "
                        f"directory; move it or choose another --out")
    if args.prompt_file and args.prompts:  # one of them would be silently ignored
        raise UserError(f"pass prompts as arguments or --prompt-file {args.prompt_file!r}, not both")
    if not args.prompt_file and not args.prompts:  # as eval: the family's own benchmark prompts, when it has them
        args.prompt_file = default_prompt_set(resolve(args.model), args.model)
    if args.prompt_file:
        n = 8 if args.max_prompts is None else args.max_prompts
        records = D.spaced_subset(D.load_prompts(args.prompt_file), n)
        prompts = [r.prompt for r in records]
    else:  # --max-prompts applies to arguments too (as steer's does); it was silently ignored here
        prompts = D.spaced_subset(check_prompt_args(args.prompts), args.max_prompts or 0)
    if not prompts:
        raise UserError("no prompts given; pass prompts as arguments or --prompt-file NAME_OR_PATH")
    if args.lora:
        check_lora_dir(args.lora)
    model = load_model(args.model, args.path, device=device, **model_kwargs)
    if args.lora:
        load_lora_checked(model, args.lora)
    validate = getattr(model, "validate_prompts", None)  # a closed vocabulary (shapes): the file and line of a bad word
    if validate is not None and args.prompt_file:
        D.check_prompts(records, validate)
    for pr in prompts:
        model.encode([pr])  # prompts with words the model does not know fail before any sampling
    note = getattr(model, "prompt_note", None)  # a closed-grammar model (shapes): known words, unknown sentence
    for pr in dict.fromkeys(prompts if note else ()):
        why = note(pr)
        if why:
            logger.warning("%s. Sampling it anyway; the model was trained on prompts of its grammar only", why)
    steps = resolve_steps(model, args.steps)
    if args.eta_file:
        from flowalign.calibrate import check_eta_grid

        check_eta_grid(eta_data, model.schedule(steps), f"--eta-file {args.eta_file!r}", steps)
        tuned = eta_data.get("model")
        if tuned is not None and tuned != args.model:
            logger.warning("--eta-file %s was calibrated for model %r, and this is %r", args.eta_file, tuned, args.model)
    out = sample_grid(model, prompts, args.out, steps=steps, guidance=args.guidance, seed=args.seed,
                      seeds_per_prompt=args.seeds, kernel=args.kernel, eta=eta, batch_size=args.batch_size,
                      progress=True)
    logger.info("wrote %s (%d prompt%s x %d seed%s)", out, len(prompts), "" if len(prompts) == 1 else "s", args.seeds,
                "" if args.seeds == 1 else "s")
    return 0
