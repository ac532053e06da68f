"""Noise-schedule maths of a DDPM, apart from any network: t*, x0 from the network output, the reverse chain.

abar_t = prod_{s<=t} (1 - beta_s) for the 0-based index t (diffusers' ``scheduler.alphas_cumprod`` and
guided-diffusion's array); in the DDPM's [-1,1] space x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, so the
noise-to-signal ratio of x_t / sqrt(abar_t) is r_t = sqrt((1 - abar_t) / abar_t). Everything is float64 on the
CPU: rounding the schedule to the network's dtype would move t*.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def adm_alphas_cumprod(schedule: str = "linear", steps: int = 1000) -> Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s), t = 0..steps-1, for guided-diffusion's named beta schedules.

    - ``linear``: beta evenly spaced from 1e-4 * 1000/steps to 0.02 * 1000/steps (Ho et al. 2020, rescaled
      so any ``steps`` matches the 1000-step process);
    - ``cosine``: beta_i = min(1 - f((i+1)/steps) / f(i/steps), 0.999), f(u) = cos((u + 0.008)/1.008 * pi/2)^2
      (Nichol & Dhariwal 2021).

    Computed in float64 as guided-diffusion does, returned as float32 (steps,).
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"diffusion_steps must be a positive integer; got {steps!r}")
    if schedule == "linear":
        scale = 1000 / steps
        betas = np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)
    elif schedule == "cosine":

        def f(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array(
            [min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)], dtype=np.float64
        )
    else:
        raise ValueError(f"noise_schedule must be 'linear' or 'cosine'; got {schedule!r}")
    return torch.from_numpy(np.cumprod(1.0 - betas)).to(torch.float32)


def as_alphas_cumprod(values: object) -> Tensor:
    """``values`` as a float64 CPU vector, checked to be a non-empty, non-increasing sequence in (0, 1]."""
    abar = torch.as_tensor(values).detach().to("cpu", torch.float64).flatten()
    if abar.numel() == 0 or not bool(((abar > 0) & (abar <= 1)).all()) or bool((abar[1:] > abar[:-1]).any()):
        raise ValueError(
            "alphas_cumprod must be a non-empty, non-increasing sequence in (0, 1] "
            "(e.g. DDPMScheduler(...).alphas_cumprod)"
        )
    return abar


def timestep(abar: Tensor, sigma: float) -> int:
    """t* = min { t : (1 - abar_t) / abar_t >= (2 sigma)^2 }: the first step whose noise covers 2 sigma, the
    std in [-1,1] units of noise of std sigma in [0,1] units."""
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    enough = torch.nonzero((1 - abar) / abar >= (2 * sigma) ** 2)
    if enough.numel() == 0:
        r_max = math.sqrt((1 - abar[-1].item()) / abar[-1].item())
        raise ValueError(f"sigma={sigma} is beyond the noise schedule: 2*sigma must be <= r_T = {r_max:.4g}")
    return int(enough[0])


def x0_from_output(out: Tensor, x_t: Tensor, abar_t: float, prediction_type: str) -> Tensor:
    """x0_hat in [-1,1] (clipped) from the network output at step t:

    epsilon:       (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)
    v_prediction:  sqrt(abar_t) x_t - sqrt(1 - abar_t) v_hat
    sample:        the output itself
    """
    if prediction_type == "epsilon":
        x0 = (x_t - math.sqrt(1 - abar_t) * out) / math.sqrt(abar_t)
    elif prediction_type == "v_prediction":
        x0 = math.sqrt(abar_t) * x_t - math.sqrt(1 - abar_t) * out
    else:
        x0 = out
    return x0.clamp(-1.0, 1.0)


def respaced_steps(t: int, k: int) -> list[int]:
    """The K-step chain's timesteps round(t (K - j) / K), j = 0..K-1, without repeats, from t downwards."""
    return sorted({round(t * (k - j) / k) for j in range(k)}, reverse=True)


def posterior(x0: Tensor, x_s: Tensor, abar_s: float, abar_p: float) -> tuple[Tensor, float, float]:
    """q(x_p | x_s, x0) of the respaced chain s -> p, beta = 1 - abar_s / abar_p (guided-diffusion's
    SpacedDiffusion): (mean, log beta~, log beta) with

        mean   = (sqrt(abar_p) beta x0 + sqrt(abar_s / abar_p) (1 - abar_p) x_s) / (1 - abar_s)
        beta~  = beta (1 - abar_p) / (1 - abar_s)   (the posterior variance; > 0 as abar_p < 1 off the end)
    """
    beta = 1 - abar_s / abar_p
    mean = (math.sqrt(abar_p) * beta / (1 - abar_s)) * x0 + (
        math.sqrt(abar_s / abar_p) * (1 - abar_p) / (1 - abar_s)
    ) * x_s
    return mean, math.log(beta * (1 - abar_p) / (1 - abar_s)), math.log(beta)
