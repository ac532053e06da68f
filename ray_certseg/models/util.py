"""Small helpers every model module shares: the dtype names of the config and the short hash in model names."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch


def short_hash(obj: Any) -> str:
    """First 8 hex digits of the SHA-1 of ``obj`` as canonical JSON (sorted keys; non-JSON values as str)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def resolve_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.float16`` / ``"bfloat16"`` / ``"bf16"`` / ``None`` -> a floating ``torch.dtype`` or None."""
    if value is None or isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str):
        aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
        dtype = getattr(torch, aliases.get(value.lower(), value.lower()), None)
    else:
        raise TypeError(f"dtype must be a torch.dtype or a name like 'bfloat16', got {type(value).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype {value!r} is not a floating torch dtype; use float32, bfloat16 or float16")
    return dtype


def free_cuda_bytes(device: torch.device) -> int:
    """Device memory this process can still allocate on a CUDA device: the driver's free memory plus what
    PyTorch's caching allocator holds reserved but unused (it serves later allocations from there)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
