"""ray-certseg: certified semantic segmentation with (diffusion-)denoised randomized smoothing on Ray."""

__version__ = "0.1.0"
