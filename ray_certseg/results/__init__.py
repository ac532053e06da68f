"""Votes -> procedures -> per-image and dataset metrics (one streaming path), analysis, plots, report."""
