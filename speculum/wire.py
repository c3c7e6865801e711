"""Tensors as raw little-endian bytes with dtype and shape: the only bulk format on wires and in Redis.

No pickle anywhere: decoding checks the dtype name against a fixed table and the byte count
against the shape, so malformed input fails cleanly instead of executing anything.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from speculum.errors import InvalidArgument

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
assert sys.byteorder == "little", "the wire format is little-endian; add byte swapping for this host"


@dataclass(frozen=True)
class RawTensor:
    dtype: str
    shape: tuple[int, ...]
    data: bytes


def encode(tensor: torch.Tensor) -> RawTensor:
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.dtype not in NAMES:
        raise TypeError(f"unsupported dtype {tensor.dtype}")
    data = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    return RawTensor(NAMES[tensor.dtype], tuple(tensor.shape), data)


def decode(raw: RawTensor, field: str = "tensor") -> torch.Tensor:
    """The tensor `raw` describes (a fresh, writable copy)."""
    if raw.dtype not in DTYPES:
        raise InvalidArgument(field, f"unsupported dtype {raw.dtype!r}")
    if any(d < 0 for d in raw.shape):
        raise InvalidArgument(field, f"negative dimension in shape {raw.shape}")
    dtype = DTYPES[raw.dtype]
    expected = math.prod(raw.shape) * torch.empty((), dtype=dtype).element_size()
    if len(raw.data) != expected:
        raise InvalidArgument(field, f"{len(raw.data)} bytes do not match shape {raw.shape} of {raw.dtype}")
    if not expected:
        return torch.empty(raw.shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw.data), dtype=dtype).reshape(raw.shape)
