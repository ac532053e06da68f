"""Continuous-noise-level denoisers: EDM (Karras et al. 2022) and consistency models (Song et al. 2023).

These models take the noise level as a continuous sigma_m, in the variance-exploding form y = x0 + sigma_m n,
n ~ N(0, I), with x0 in [-1, 1]. The sampler draws x + delta, delta ~ N(0, sigma^2 I), in [0, 1] units, so in
the model's units

    y = 2 (x + delta) - 1 = x0 + 2 delta,      x0 = 2 x - 1,      2 delta ~ N(0, (2 sigma)^2 I).

That is exactly the model's form at sigma_m = 2 sigma_eff (sigma_eff = sigma, or sigma / sqrt(f_h f_w) when
downsampled, :mod:`ray_certseg.models.resolution`). There is no timestep to round to, unlike the DDPM's t*
(``models.schedule``), and no rescaling of the input. The denoiser is the model's own preconditioned D:

    D(y; s) = c_skip(s) y + c_out(s) F(c_in(s) y, c_noise(s)),      c_in(s) = 1 / sqrt(s^2 + sigma_data^2)

computed with the scheduler's own functions:

* ``CMStochasticIterativeScheduler`` (consistency models): c_noise = ``sigma_to_t(s)`` = 250 log s, and
  (c_skip, c_out) = ``get_scalings_for_boundary_condition(s)``:
  c_skip = sigma_data^2 / ((s - sigma_min)^2 + sigma_data^2), c_out = (s - sigma_min) sigma_data / sqrt(s^2 +
  sigma_data^2). This is one step of its pipeline with no noise added after it.
* ``EDMEulerScheduler`` (EDM): ``precondition_inputs`` (c_in), ``precondition_noise`` (c_noise = log(s) / 4)
  and ``precondition_outputs`` (c_skip = sigma_data^2 / (s^2 + sigma_data^2), c_out = +-s sigma_data /
  sqrt(s^2 + sigma_data^2) for epsilon / v prediction).

The output is (clip(D, -1, 1) + 1) / 2. The network was trained for s in [sigma_min, sigma_max] (the scheduler
config's); a sigma with 2 sigma_eff outside that range is refused (on the driver too: :func:`sigma_range`).
As for every denoiser, the smoothing noise is exactly N(0, sigma^2 I): the certificate holds at sigma whatever
the model does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ray_certseg.models.resolution import ImageDenoiser
from ray_certseg.models.util import short_hash

#: diffusers schedulers whose models take a continuous sigma, and how each preconditions
KARRAS_SCHEDULERS = ("CMStochasticIterativeScheduler", "EDMEulerScheduler")


def sigma_range(scheduler_config: Mapping[str, Any]) -> tuple[float, float]:
    """The smoothing sigmas (in [0, 1] pixel units) a model of this scheduler denoises: [sigma_min / 2,
    sigma_max / 2], since the model sees noise of std 2 sigma in its [-1, 1] units."""
    return float(scheduler_config["sigma_min"]) / 2, float(scheduler_config["sigma_max"]) / 2


class KarrasDenoiser(ImageDenoiser):
    """One-shot continuous-sigma denoiser; ``forward(noisy, sigma)`` implements the denoiser protocol.

    ``model(y, c_noise)``: the network F, (B, 3, h, w) and a float tensor (B,) -> (B, 3, h, w).
    ``scheduler``: a diffusers scheduler of :data:`KARRAS_SCHEDULERS`, whose functions precondition (see the
    module docstring). ``placement``: where the network runs, :class:`ImageDenoiser`'s options (resolution,
    sample_size, tile_overlap, multiple_of, tile_pixels). ``name`` is recorded in outputs;
    when empty, ``"karras-<hash of the scheduler config and options>"``."""

    def __init__(
        self,
        model: Callable[[Tensor, Tensor], Tensor],
        scheduler: Any,
        *,
        name: str = "",
        **placement: Any,
    ):
        kind = type(scheduler).__name__
        if kind not in KARRAS_SCHEDULERS:
            raise TypeError(f"scheduler must be one of {KARRAS_SCHEDULERS}, got {kind}")
        super().__init__(model, **placement)
        self.scheduler, self.kind = scheduler, kind
        self.sigma_data = float(scheduler.config.sigma_data)
        self.sigma_range = sigma_range(scheduler.config)
        self.probe_sigma = min(max(self.probe_sigma, self.sigma_range[0]), self.sigma_range[1])
        config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
        where = ("resolution", "sample_size", "tile_overlap", "multiple_of")
        options = {**{k: getattr(self, k) for k in where}, "scheduler": [kind, config]}
        self.name = name or f"karras-{short_hash(options)}"

    def check_sigma(self, sigma_eff: float) -> None:
        """Refuse a sigma the network was not trained for (2 sigma_eff outside [sigma_min, sigma_max])."""
        lo, hi = self.sigma_range
        if not lo <= sigma_eff <= hi:
            raise ValueError(
                f"sigma {sigma_eff:g} is outside this {self.kind} model's range [{lo:g}, {hi:g}] "
                f"(its sigma_min / 2 and sigma_max / 2: the model sees noise of std 2 sigma)"
            )

    def _denoise(self, x: Tensor, sigma_eff: float) -> Tensor:
        """D(2x - 1; 2 sigma_eff), clipped, back in [0, 1] (module docstring)."""
        self.check_sigma(sigma_eff)
        s = 2.0 * sigma_eff
        y = 2 * x - 1
        batch = x.shape[0]
        if self.kind == "CMStochasticIterativeScheduler":
            c_noise = torch.full((batch,), float(self.scheduler.sigma_to_t(s)), device=x.device)
            c_skip, c_out = (float(c) for c in self.scheduler.get_scalings_for_boundary_condition(s))
            out = self._network(y / math.sqrt(s * s + self.sigma_data**2), c_noise)
            denoised = c_skip * y + c_out * out
        else:
            sigma = torch.tensor(s, dtype=torch.float64)
            c_noise = self.scheduler.precondition_noise(sigma).to(x.device, torch.float32).expand(batch)
            out = self._network(self.scheduler.precondition_inputs(y, s), c_noise)
            denoised = self.scheduler.precondition_outputs(y, out, s)
        return (denoised.clamp(-1, 1) + 1) / 2

    def _network(self, y: Tensor, c_noise: Tensor) -> Tensor:
        out = self.model(y, c_noise)
        if not isinstance(out, Tensor) or out.shape != y.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"denoiser model must return (B, 3, h, w) at its input size, got {got}")
        return out.float()
