"""Models of the base classifier f(x + delta) = segment(denoise(x + delta)): denoisers and segmenters."""

from ray_certseg.models.denoisers import DiffusionDenoiser, IdentityDenoiser, load_denoiser
from ray_certseg.models.segmenters import Segmenter, load_segmenter

__all__ = ["DiffusionDenoiser", "IdentityDenoiser", "Segmenter", "load_denoiser", "load_segmenter"]
