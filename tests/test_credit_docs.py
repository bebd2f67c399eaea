"""docs/credit.md's "Adding a credit method" example runs as written: registered, and
giving the group z-score of R(x_T) − V_x0(x_s) on every trained step (Gaussian world)."""

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
