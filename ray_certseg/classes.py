"""The dtype of a class map (c_hat, labels, predictions): numpy only, shared by the sampler and the statistics."""

from __future__ import annotations

import numpy as np


def class_dtype(num_classes: int) -> type:
    """uint8 when C <= 256, int16 when C <= 2**15, else int32."""
    return np.uint8 if num_classes <= 256 else np.int16 if num_classes <= 2**15 else np.int32
