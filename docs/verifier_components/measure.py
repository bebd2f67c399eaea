"""How many strict passes on shapes-bench hold a component no rendered scene makes (docs/shapes.md, "Known limitation").

    python docs/verifier_components/measure.py                      # the shipped base
    python docs/verifier_components/measure.py runs/shapes_grpo/checkpoints/step-30   # a LoRA of `make demo`

Samples the shapes-bench protocol's 960 images (ODE, 12 steps, CFG 4, 4 seeds, seed 0: the strict accuracy equals the
protocol's), and for each strict pass checks whether a detected component has coverage area > A px or elongation
sqrt(lambda_max / lambda_min) of its coverage covariance > E (rendered scenes: at most 1.25), for several (A, E).
A measurement for the docs, not part of the package: it reads the verifier's internals (``verify._shape_cues``).
"""

import sys

import numpy as np
import torch

from flowalign import data as D
from flowalign.evaluate import as_records, sample_and_score
from flowalign.models import load_model
from flowalign.shapes import verify as V

GATES = ((96, 1.5), (96, 2.0), (128, 2.5), (96, float("inf")), (float("inf"), 2.0))  # (area A, elongation E)
_elongations: list[float] = []
_cues = V._shape_cues


def _cues_and_elongation(a, x, y, area):  # called once per detected object, in detect()'s order
    w = a / area
    cov = np.array([[(w * x * x).sum(), (w * x * y).sum()], [(w * x * y).sum(), (w * y * y).sum()]])
    ev = np.linalg.eigvalsh(cov)
    _elongations.append(float(np.sqrt(ev[1] / max(ev[0], 1e-9))))
    return _cues(a, x, y, area)


V._shape_cues = _cues_and_elongation


class Probe:
    name = "probe"

    def __init__(self):
        self.rows = []  # (strict, [(area, elongation) per object])

    def __call__(self, images, prompts, metadata=None):
        for im, p in zip(images, prompts):
            _elongations.clear()
            objs = V.detect(im.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
            clauses = V.score(objs, V.parse(p))
            self.rows.append((all(v == 1.0 for v in clauses.values()),
                              [(o["area"], e) for o, e in zip(objs, _elongations)]))
        return torch.zeros(len(prompts))


def rendered(n: int = 1500, seed: int = 0) -> None:
    """The largest area and elongation of any component in ``n`` scenes of the project's renderer (every task)."""
    from flowalign.shapes.grammar import sample_spec
    from flowalign.shapes.render import render

    rng = np.random.default_rng(seed)
    areas, elongs = [], []
    for _ in range(n):
        _elongations.clear()
        objs = V.detect(render(sample_spec(rng), 32, rng))
        areas += [o["area"] for o in objs]
        elongs += list(_elongations)
    print(f"rendered: {n} scenes, {len(areas)} objects; max area {max(areas):.1f} px, max elongation {max(elongs):.3f}")


def main(lora=None):
    if lora is None:
        rendered()
    model = load_model("shapes")
    if lora:
        model.add_lora()
        model.load_lora(lora)
    probe = Probe()
    sample_and_score(model, as_records(D.load_prompts("shapes-bench")), {"probe": probe}, steps=12, guidance=4.0,
                     seeds_per_prompt=4, batch_size=32, seed=0)
    passes = sum(s for s, _ in probe.rows)
    print(f"{lora or 'base'}: {len(probe.rows)} images, strict {passes} ({passes / len(probe.rows):.4f})")
    for a_max, e_max in GATES:
        n = sum(1 for s, objs in probe.rows if s and any(a > a_max or e > e_max for a, e in objs))
        flagged = sum(1 for _, objs in probe.rows if any(a > a_max or e > e_max for a, e in objs))
        print(f"  area > {a_max:g} or elongation > {e_max:g}: {n} of {passes} strict passes; {flagged} images in all")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
