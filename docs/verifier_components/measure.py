"""How many strict passes on shapes-bench hold a component no rendered scene makes (docs/shapes.md, "Known limitation").

    python docs/verifier_components/measure.py                      # the shipped base (and the rendered scenes)
    python docs/verifier_components/measure.py runs/shapes_grpo/checkpoints/step-30   # a LoRA of `make demo`
    python docs/verifier_components/measure.py --sheets             # + contact sheets of the flagged passes

Samples the shapes-bench protocol's 960 images (ODE, 12 steps, CFG 4, 4 seeds, seed 0: the strict accuracy equals the
protocol's), and for each strict pass checks whether a detected component has coverage area > A px or elongation
sqrt(lambda_max / lambda_min) of its coverage covariance > E (the verifier's ``elongation``; rendered scenes: at most
1.18), for several (A, E); (96, 2) is the verifier's integrity gate (``intact``, the ``shapes_strict_intact`` reward).
``--sheets`` writes docs/verifier_components/<base|lora>_{gated,oval}_passes.png: the strict passes the gate flags,
and those with an elongation in (1.5, 2] it lets through (each image ×4, its prompt, largest elongation and area).
A measurement for the docs, not part of the package.
"""

import sys
from pathlib import Path

import numpy as np
import torch

from flowalign import data as D
from flowalign.evaluate import as_records, sample_and_score
from flowalign.models import load_model
from flowalign.shapes import verify as V

GATES = ((96, 1.5), (96, 2.0), (128, 2.5), (96, float("inf")), (float("inf"), 2.0))  # (area A, elongation E)
HERE = Path(__file__).resolve().parent


class Probe:
    name = "probe"

    def __init__(self, keep: bool):
        self.rows = []  # (strict, [(area, elongation) per object], prompt)
        self.images = [] if keep else None

    def __call__(self, images, prompts, metadata=None):
        for im, p in zip(images, prompts):
            arr = im.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()  # [H, W, 3]
            r = V.verify(arr, p)
            self.rows.append((r.strict == 1.0, [(o["area"], o["elongation"]) for o in r.objects], p))
            if self.images is not None:
                self.images.append(arr)
        return torch.zeros(len(prompts))


def rendered(n: int = 1500, seed: int = 0) -> None:
    """The largest area and elongation of any component in ``n`` scenes of the project's renderer (every task)."""
    from flowalign.shapes.grammar import sample_spec
    from flowalign.shapes.render import render

    rng = np.random.default_rng(seed)
    objs = [o for _ in range(n) for o in V.detect(render(sample_spec(rng), 32, rng))]
    print(f"rendered: {n} scenes, {len(objs)} objects; max area {max(o['area'] for o in objs):.1f} px, "
          f"max elongation {max(o['elongation'] for o in objs):.3f}")


def sheet(probe: Probe, idx: list, path: Path, cols: int = 8, scale: int = 4) -> None:
    from PIL import Image, ImageDraw

    side = 32 * scale
    canvas = Image.new("RGB", (cols * side, max(1, -(-len(idx) // cols)) * (side + 24)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, i in enumerate(idx):
        img = Image.fromarray((probe.images[i] * 255).round().astype(np.uint8)).resize((side, side), Image.NEAREST)
        x, y = (k % cols) * side, (k // cols) * (side + 24)
        canvas.paste(img, (x, y))
        _, objs, prompt = probe.rows[i]
        draw.text((x + 2, y + side), prompt[:26], fill="black")
        draw.text((x + 2, y + side + 11), f"#{i} e {max(e for _, e in objs):.2f}  a {max(a for a, _ in objs):.0f}",
                  fill="black")
    canvas.convert("P", palette=Image.ADAPTIVE, colors=64).save(path, optimize=True)
    print(f"wrote {path} ({len(idx)} images)")


def main(argv):
    sheets = "--sheets" in argv
    args = [a for a in argv if a != "--sheets"]
    lora = args[0] if args else None
    if lora is None:
        rendered()
    model = load_model("shapes")
    if lora:
        model.add_lora()
        model.load_lora(lora)
    probe = Probe(keep=sheets)
    sample_and_score(model, as_records(D.load_prompts("shapes-bench")), {"probe": probe}, steps=12, guidance=4.0,
                     seeds_per_prompt=4, batch_size=32, seed=0)
    passes = sum(s for s, _, _ in probe.rows)
    print(f"{lora or 'base'}: {len(probe.rows)} images, strict {passes} ({passes / len(probe.rows):.4f})")
    for a_max, e_max in GATES:
        n = sum(1 for s, objs, _ in probe.rows if s and any(a > a_max or e > e_max for a, e in objs))
        flagged = sum(1 for _, objs, _ in probe.rows if any(a > a_max or e > e_max for a, e in objs))
        print(f"  area > {a_max:g} or elongation > {e_max:g}: {n} of {passes} strict passes; {flagged} images in all")
    if sheets:
        gated = [i for i, (s, objs, _) in enumerate(probe.rows)
                 if s and any(a > V.INTACT_MAX_AREA or e > V.INTACT_MAX_ELONGATION for a, e in objs)]
        oval = [i for i, (s, objs, _) in enumerate(probe.rows) if s and i not in set(gated)
                and any(e > 1.5 for _, e in objs)]
        tag = "lora" if lora else "base"
        sheet(probe, gated[:48], HERE / f"{tag}_gated_passes.png")
        sheet(probe, oval[:48], HERE / f"{tag}_oval_passes.png")


if __name__ == "__main__":
    main(sys.argv[1:])
