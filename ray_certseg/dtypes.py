"""The integer widths of class maps and vote counts: numpy only, shared by the sampler, the statistics, the vote
schema and the config checks, so that what the sampler writes is what the schema and the checks allow."""

from __future__ import annotations

import numpy as np

#: the largest vote count and class id a uint16 column holds (n, num_classes, label ids)
MAX_UINT16 = 65535
#: the most classes whose labels fit uint8 with 255 left for the ignore label
UINT8_LABEL_CLASSES = 254


def class_dtype(num_classes: int) -> type:
    """The dtype of a class map (c_hat, labels, predictions): uint8 when C <= 256, int16 when C <= 2**15, else
    int32."""
    return np.uint8 if num_classes <= 256 else np.int16 if num_classes <= 2**15 else np.int32
