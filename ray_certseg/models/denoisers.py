"""Denoisers for denoised smoothing: ``denoiser(noisy (B,3,H,W), sigma) -> denoised (B,3,H,W)``, all in [0,1].

``DiffusionDenoiser`` is the one-shot DDPM denoiser of Carlini et al. (2023), used for segmentation by
Laousy et al. (2023). The sampler adds delta ~ N(0, sigma^2 I) to x in [0,1]; the DDPM works in [-1,1],
where the noise is 2*sigma. With abar_t the cumulative product of (1 - beta) and
r_t = sqrt((1 - abar_t) / abar_t):

    t*      = min { t : r_t >= 2 * sigma_eff }
    x_t*    = sqrt(abar_t*) * (2 (x + delta) - 1) = sqrt(abar_t*) (x0 + 2 delta),   x0 = 2x - 1
    x0_hat  = (x_t* - sqrt(1 - abar_t*) eps_hat) / sqrt(abar_t*)     (epsilon prediction)
            =  sqrt(abar_t*) x_t* - sqrt(1 - abar_t*) v_hat           (v prediction)
            =  model output                                            (sample prediction)
    output  = (clip(x0_hat, -1, 1) + 1) / 2

No noise is added here: x_t* / sqrt(abar_t*) carries exactly the sampler's noise, 2 delta of std
2 sigma_eff, and nothing else. The model is told the noise level r_t* of its own schedule, the smallest one
>= 2 sigma_eff, so it assumes slightly more noise than there is: r_t* / (2 sigma) - 1 = 0.63% at sigma 0.25,
0.03% at 0.33 and 0.48% at 0.5 on the linear 1000-step schedule. That mismatch affects only how well the
model denoises. The smoothing noise is exactly N(0, sigma^2 I), so the certificate holds exactly at sigma
(it is not conservative, and nothing needs to be assumed about the model).

Indexing: t is the 0-based index into ``alphas_cumprod`` (diffusers' ``scheduler.alphas_cumprod`` and
guided-diffusion's array), i.e. abar_t = prod_{s<=t} (1 - beta_s), and the same integer is the timestep given
to the network. For the linear 1000-step schedule this gives t* = 145, 259, 396 for sigma = 0.25, 0.5, 1.0,
the same as the loop ``t = 1, 2, ...`` over that array in Carlini et al.'s certify.py (method.md §3.4).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ray_certseg.models import schedule
from ray_certseg.models.resolution import ImageDenoiser
from ray_certseg.models.util import short_hash


class IdentityDenoiser(nn.Module):
    """No denoising: the noisy image goes to the segmenter as is (the SegCertify baseline)."""

    name = "identity"

    def forward(self, noisy: Tensor, sigma: float) -> Tensor:
        return noisy


class DiffusionDenoiser(ImageDenoiser):
    """One-shot (or K-step) DDPM denoiser; ``forward(noisy, sigma)`` implements the denoiser protocol.

    model(x_t, t) -> raw network output (B, 3 or 6, h, w), t a LongTensor (B,); with 6 channels (learned
    variance, guided-diffusion) the first 3 are used. alphas_cumprod: abar_t, t = 0..T-1 (see module doc).
    ``resolution``, ``sample_size``, ``tile_overlap``, ``multiple_of``, ``tile_pixels``: where the UNet runs
    (:mod:`ray_certseg.models.resolution`); in ``resize`` mode sigma_eff sets t*.

    multistep = K > 0: instead of one-shot x0_hat, K reverse DDPM steps on the timesteps
    round(t* (K - j) / K), j = 0..K-1 (DensePure-style): at each step s -> p, with beta = 1 - abar_s / abar_p
    (the respaced chain's beta, as guided-diffusion's SpacedDiffusion), x0_hat is clipped and x moves to the
    posterior q(x_p | x_s, x0_hat): mean (sqrt(abar_p) beta x0_hat + sqrt(abar_s / abar_p)(1 - abar_p) x_s)
    / (1 - abar_s), log-variance
      * ``fixed``:   log beta~,  beta~ = beta (1 - abar_p) / (1 - abar_s) (the posterior variance);
      * ``learned``: f log beta + (1 - f) log beta~, f = (v + 1) / 2, v the model's last 3 output channels
        (guided-diffusion's LEARNED_RANGE, ``p_mean_variance``; diffusers' ``variance_type="learned_range"``).
        beta~ needs no clipping here: p is never the chain's final index, so abar_p < 1 and beta~ > 0.
    ``variance="auto"`` (default) is ``learned`` for a model with 6 output channels, else ``fixed``. The last
    step returns x0_hat. The posterior noise comes from a generator re-seeded with ``multistep_seed`` on every
    call and is shared by all images of a batch, so the denoiser is a fixed deterministic function of each
    noisy image (independent of batching).

    ``name`` is recorded in outputs verbatim; when empty, ``"diffusion-<hash of schedule and options>"``.
    """

    VARIANCES = ("auto", "learned", "fixed")
    PREDICTION_TYPES = schedule.PREDICTION_TYPES

    def __init__(
        self,
        model: Callable[[Tensor, Tensor], Tensor],
        alphas_cumprod: Tensor,
        *,
        prediction_type: str = "epsilon",
        resolution: str = "native",
        sample_size: int | None = None,
        tile_overlap: int = 16,
        multiple_of: int = 8,
        multistep: int = 0,
        multistep_seed: int = 0,
        variance: str = "auto",
        tile_pixels: int | None = None,
        name: str = "",
    ):
        abar = schedule.as_alphas_cumprod(alphas_cumprod)
        if prediction_type not in self.PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {self.PREDICTION_TYPES}, got {prediction_type!r}"
            )
        super().__init__(
            model,
            resolution=resolution,
            sample_size=sample_size,
            tile_overlap=tile_overlap,
            multiple_of=multiple_of,
            tile_pixels=tile_pixels,
        )
        if not (isinstance(multistep, int) and multistep >= 0):
            raise ValueError(f"multistep must be an int >= 0 (0 = one-shot), got {multistep!r}")
        if variance not in self.VARIANCES:
            raise ValueError(f"variance must be one of {self.VARIANCES}, got {variance!r}")
        # float64 on the CPU, deliberately not a buffer: module.to(dtype) must not round the schedule.
        self.alphas_cumprod = abar
        self.prediction_type = prediction_type
        self.multistep, self.multistep_seed, self.variance = multistep, int(multistep_seed), variance
        options = {
            "prediction_type": prediction_type,
            "resolution": resolution,
            "sample_size": sample_size,
            "tile_overlap": tile_overlap,
            "multiple_of": multiple_of,
            "multistep": multistep,
            "multistep_seed": self.multistep_seed,
            "alphas_cumprod": abar.tolist(),
        }
        if multistep:  # one-shot denoising never uses a variance: its default names stay as they were
            options["variance"] = variance
        self.name = name or f"diffusion-{short_hash(options)}"

    # -------------------------------------------------------------------------------------------- timestep
    def timestep(self, sigma: float) -> int:
        """t* = min { t : (1 - abar_t) / abar_t >= (2 sigma)^2 }, sigma the noise std in [0,1] units at the
        model input (``forward`` passes sigma_eff). 0-based index into alphas_cumprod."""
        return schedule.timestep(self.alphas_cumprod, sigma)

    # ------------------------------------------------------------------------------------------- DDPM maths
    def _denoise(self, x: Tensor, sigma_eff: float) -> Tensor:
        """[0,1] noisy images at the model's input size -> [0,1] denoised (one-shot or multistep)."""
        t = self.timestep(sigma_eff)
        x_t = math.sqrt(self.alphas_cumprod[t].item()) * (2 * x - 1)
        x0 = self._reverse_chain(x_t, t) if self.multistep else self.x0_hat(x_t, t)
        return (x0 + 1) / 2

    def x0_hat(self, x_t: Tensor, t: int) -> Tensor:
        """Clipped estimate of x0 in [-1,1] from one network call at timestep t (see module doc)."""
        return self._predict(x_t, t)[0]

    def _predict(self, x_t: Tensor, t: int) -> tuple[Tensor, Tensor | None]:
        """(clipped x0_hat, the variance channels v of a 6-channel model or None) from one network call."""
        tt = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
        out = self.model(x_t, tt)
        c = x_t.shape[1]
        if (
            not isinstance(out, Tensor)
            or out.ndim != 4
            or out.shape[1] not in (c, 2 * c)
            or out.shape[-2:] != x_t.shape[-2:]
        ):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"denoiser model must return (B, {c} or {2 * c}, h, w) at its input size, got {got}"
            )
        var_values = out[:, c:].float() if out.shape[1] == 2 * c else None
        out = out[:, :c].float()
        x0 = schedule.x0_from_output(out, x_t, self.alphas_cumprod[t].item(), self.prediction_type)
        return x0, var_values

    def _reverse_chain(self, x_t: Tensor, t: int) -> Tensor:
        """K ancestral DDPM steps on round(t (K - j) / K), j = 0..K-1, ending with x0_hat (see class doc)."""
        steps = schedule.respaced_steps(t, self.multistep)
        generator = torch.Generator(device=x_t.device).manual_seed(self.multistep_seed)
        x = x_t
        for s, prev in itertools.pairwise(steps):
            x0, v = self._predict(x, s)
            mean, log_var, log_beta = schedule.posterior(
                x0, x, self.alphas_cumprod[s].item(), self.alphas_cumprod[prev].item()
            )
            if self.variance == "learned" and v is None:
                raise ValueError(
                    "variance='learned' needs a model with 6 output channels (learned variance, e.g. an ADM "
                    "checkpoint with learn_sigma); this one returns 3: use variance='fixed' or 'auto'"
                )
            z = torch.randn((1, *x.shape[1:]), generator=generator, device=x.device)
            if v is not None and self.variance != "fixed":
                frac = (v + 1) / 2
                x = mean + torch.exp(0.5 * (frac * log_beta + (1 - frac) * log_var)) * z
            else:
                x = mean + math.exp(0.5 * log_var) * z
        return self.x0_hat(x, steps[-1])
