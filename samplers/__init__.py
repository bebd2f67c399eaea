"""Flow-matching samplers with exact per-step log-probabilities (installs as ``flowalign.samplers``).

- ``schedules``: sigma grids (SD3 diffusers double shift, FLUX dynamic shift, shifted linear).
- ``kernels``: Gaussian step kernels (euler, flow_sde, dance_sde, cps) and ``gaussian_log_prob``.
- ``loop``: ``sample`` (ODE / SDE / windowed SDE in one loop), ``branch``, ``step_log_prob``.
"""

from flowalign.samplers.kernels import KERNELS, gaussian_log_prob, get_kernel
from flowalign.samplers.loop import branch, eta_schedule, gather_cond, live_eta, sample, step_log_prob
from flowalign.samplers.schedules import SCHEDULES, flux_dynamic, sd3_diffusers, shifted_linear

__all__ = ["KERNELS", "SCHEDULES", "branch", "eta_schedule", "live_eta", "flux_dynamic", "gather_cond", "gaussian_log_prob",
           "get_kernel", "sample", "sd3_diffusers", "shifted_linear", "step_log_prob"]
