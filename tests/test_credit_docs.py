"""docs/credit.md as written: its "Adding a credit method" example runs, registered, and gives the group z-score of
R(x_T) − V_x0(x_s) on every trained step (Gaussian world); its probe-ranking tables print the figures of the
committed `bench credit` JSON files (docs/probe_ranking/)."""

import json
import re
from pathlib import Path

import torch

from flowalign.credit import CREDIT, CreditInput, assign_credit, group_normalize
from flowalign.values import make_probe

from test_credit_methods import _gw_rollout, gaussian_world_velocity, score

ROOT = Path(__file__).resolve().parents[1]


def _example() -> str:
    text = (ROOT / "docs" / "credit.md").read_text()
    block = re.search(r"<!-- credit-example:start -->\s*```python\n(.*?)```\s*<!-- credit-example:end -->", text, re.S)
    assert block, "docs/credit.md lost its credit example"
    return block.group(1)


def test_the_documented_credit_method_runs_and_means_what_the_docs_say():
    from flowalign.samplers import eta_schedule

    ns: dict = {}
    exec(compile(_example(), "docs/credit.md", "exec"), ns)  # noqa: S102 (our own docs)
    try:
        assert CREDIT["gain_after_first_step"] is ns["gain_after_first_step"]
        eta = eta_schedule(6, 0.7, window=(2, 3))
        traj = _gw_rollout(eta)
        term = score(traj.final, None)
        trained = (eta > 0)[None].expand(traj.batch_size, -1).clone()
        probe = make_probe(gaussian_world_velocity, traj, score, terminal=term)
        inp = CreditInput(traj=traj, rewards={"r": term["r"]}, reward_weights={"r": 1.0}, trained=trained, probe=probe)
        adv = assign_credit("gain_after_first_step", inp).advantages  # [B, T]
        x0 = traj.latents[:, 2] - traj.sigmas[2] * traj.velocities[:, 2]  # x̂0 at the first trained state s = 2
        want = group_normalize(term["r"] - score(x0, None)["r"], traj.group)  # [B]
        assert torch.allclose(adv[:, 2:5], want[:, None].expand(-1, 3), atol=1e-5)
        assert (adv[:, [0, 1, 5]] == 0).all()
    finally:
        CREDIT.pop("gain_after_first_step", None)


# ------------------------------------------------------------ the ranking tables against the committed bench JSON

RANKING = ROOT / "docs" / "probe_ranking"
REWARD_FILE = {"`shapes_partial`": "shapes_partial", "`saturation`": "saturation",
               "video: `shapes_motion_partial`": "video"}


def _num(text: str) -> float:
    return float(text.replace("−", "-").strip("*"))


def _printed(cell: str, value: float) -> bool:
    """Whether ``cell`` is ``value`` printed to the cell's digits (the JSON keeps three decimals, so 0.835 may have
    been printed 0.84 from the unrounded figure)."""
    digits = len(cell.split(".")[1]) if "." in cell else 0
    return abs(_num(cell) - value) <= 0.5 * 10 ** -digits + 1e-9


def _rows(header_start: str) -> list[list[str]]:
    """The cells of each data row of the docs/credit.md table whose header line starts with ``header_start``."""
    lines = (ROOT / "docs" / "credit.md").read_text(encoding="utf-8").split("\n")
    start = next(i for i, ln in enumerate(lines) if ln.startswith(header_start))
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip().strip("|").split("|")])
    return rows


def _figures(name: str) -> tuple[dict, dict]:
    data = json.loads((RANKING / f"{name}.json").read_text())
    model = next(iter(data["ranking"]))
    return data["ranking"][model], data["ranking_references"][model]


def test_the_probe_ranking_table_matches_the_committed_bench_json():
    """docs/credit.md's ranking table (mean ρ and ρ by state per reward and probe) prints the figures of
    docs/probe_ranking/*.json, the files its commands write, to the printed digits: a re-run that changed the JSON
    without the table (or the reverse) fails here."""
    rows = _rows("| reward | probe | NFE × Flow-GRPO | mean ρ |")
    assert len(rows) == 20
    for reward, probe, _nfe, mean, by_state in rows:
        ranking, _ = _figures(REWARD_FILE[reward])
        fig = ranking[probe.split(" ")[0]]
        assert _printed(mean, fig["spearman_mean"]), (reward, probe)
        cells = by_state.split()
        assert len(cells) == len(fig["by_state"]) and all(map(_printed, cells, fig["by_state"])), (reward, probe)


def test_the_reference_tables_match_the_committed_bench_json():
    """The `--rank-references` tables (each probe against `ode:full`, `fine:4` and `sde:16`; the split-half row;
    ρ by state on `shapes_partial`) print the JSON's figures to three (by state: two) digits. The bracketed
    "earlier draw" figures come from an earlier version's run and are not in the JSON."""
    def mean(ranking, refs, probe, ref):
        name = probe.strip("`")
        if ref == "ode:full":
            return 1.0 if name == "ode:full" else (refs["fine:4"]["ode:full"] if name == "fine:4" else ranking[name])[
                "spearman_mean"]
        if name == ref:
            return 1.0
        if name.startswith("sde:16`'s two halves"):
            return refs["sde:16"]["split-half (8 vs 8)"]["spearman_mean"]
        if ref == "fine:4" and name == "ode:full":
            return refs["fine:4"]["ode:full"]["spearman_mean"]
        return refs[ref][name]["spearman_mean"]

    checked = 0
    for header, files in (("| probe | NFE × Flow-GRPO | `shapes_partial`: vs `ode:full`", ("shapes_partial", "saturation")),
                          ("| probe | NFE × Flow-GRPO | vs `ode:full` | vs `fine:4` |", ("video",))):
        for row in _rows(header):
            probe, cells = row[0], row[2:]
            for k, name in enumerate(files):
                ranking, refs = _figures(name)
                for ref, cell in zip(("ode:full", "fine:4", "sde:16"), cells[3 * k: 3 * k + 3]):
                    if cell == "–":
                        continue
                    assert _printed(cell.split(" (")[0], mean(ranking, refs, probe, ref)), (name, probe, ref)
                    checked += 1
    assert checked == 2 * 7 * 3 + 2 + 9 * 3 - 2  # every cell that is not a dash
    _, refs = _figures("shapes_partial")
    ranking, _ = _figures("shapes_partial")
    by_state = {"`ode:full` vs `fine:4`": refs["fine:4"]["ode:full"], "`ode:full` vs `sde:16`": refs["sde:16"]["ode:full"],
                "`ode/3` vs `sde:16`": refs["sde:16"]["ode/3"], "`sde:16`'s two halves": refs["sde:16"]["split-half (8 vs 8)"]}
    for pair, values in _rows("| pair | ρ by state |"):
        cells, figures = values.split(), by_state[pair]["by_state"]
        assert len(cells) == len(figures) and all(map(_printed, cells, figures)), pair
