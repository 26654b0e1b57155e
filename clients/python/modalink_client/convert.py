"""Messages <-> numpy and plain values, as the client needs them (numpy only; the services use ``modalink.wire``).

Tensors are raw little-endian bytes with a dtype from a short list; a received tensor is checked (dtype, shape
against the byte count, a size limit, finite values) before it becomes an array. Nothing is ever unpickled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

try:
    from modalink_client.v1 import common_pb2
except TypeError as e:  # protobuf: "Couldn't build proto file into descriptor pool: duplicate file name ..."
    raise ImportError(
        "modalink_client's stubs and other modalink/v1 stubs already loaded in this process (the modalink package's)"
        " were generated from different protos: regenerate both from the same ones (`make stubs`)"
    ) from e

DTYPES = {"float32": "<f4", "float16": "<f2", "float64": "<f8", "int64": "<i8", "int32": "<i4", "uint8": "u1"}
MAX_TENSOR_BYTES = 256 << 20
MAX_TENSOR_DIMS = 8

# GenerationParams' fields and defaults (modalink.engine.GenerationParams; zero values mean "default" on the wire)
PARAM_DEFAULTS: dict[str, Any] = {"max_new_tokens": 128, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                                  "repetition_penalty": 1.0, "stop": (), "seed": None}  # fmt: skip


def to_tensor_msg(x: Any) -> common_pb2.Tensor:
    """A Tensor message from an array (numpy, or anything with ``.detach().cpu().numpy()`` such as a torch tensor)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    name = arr.dtype.name
    if name not in DTYPES:
        raise ValueError(f"tensor dtype {name} not supported; use one of {', '.join(DTYPES)}")
    data = np.ascontiguousarray(arr, dtype=np.dtype(DTYPES[name])).tobytes()
    return common_pb2.Tensor(dtype=name, shape=list(arr.shape), data=data)


def from_tensor_msg(
    msg: common_pb2.Tensor, what: str = "tensor", dtypes: Sequence[str] = ("float32",), ndim: int | None = None
) -> np.ndarray:
    """A checked numpy array from a Tensor message; ValueError says what is wrong."""
    if msg.dtype not in dtypes:
        raise ValueError(f"{what}: dtype must be {' or '.join(dtypes)}, got {msg.dtype or '(empty)'!r}")
    shape = tuple(int(d) for d in msg.shape)
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{what}: expected {ndim} dimensions, got shape {list(shape)[:16]}")
    if len(shape) > MAX_TENSOR_DIMS:
        raise ValueError(f"{what}: {len(shape)} dimensions; at most {MAX_TENSOR_DIMS}")
    if any(d < 0 for d in shape):
        raise ValueError(f"{what}: negative dimension in shape {list(shape)}")
    if len(msg.data) > MAX_TENSOR_BYTES:
        raise ValueError(f"{what}: {len(msg.data)} bytes exceeds the limit of {MAX_TENSOR_BYTES}")
    dt = np.dtype(DTYPES[msg.dtype])
    # numpy refuses even an empty array whose nonzero dimensions multiply past its limit ([0, 2**61])
    if math.prod(d or 1 for d in shape) * dt.itemsize > MAX_TENSOR_BYTES:
        raise ValueError(f"{what}: shape {list(shape)} is over the limit of {MAX_TENSOR_BYTES} bytes")
    # Python ints: a product that overflows int64 (and wraps to the data's length) cannot slip through.
    needed = math.prod(shape) * dt.itemsize
    if needed != len(msg.data):
        raise ValueError(f"{what}: shape {list(shape)} of {msg.dtype} needs {needed} bytes, got {len(msg.data)}")
    arr = np.frombuffer(msg.data, dtype=dt).reshape(shape)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{what}: contains NaN or Inf")
    return arr.astype(arr.dtype.newbyteorder("="))


def params_to_msg(params: Any = None, **kw) -> common_pb2.GenerationParams:
    """A GenerationParams message from keyword arguments (max_new_tokens, temperature, top_p, top_k,
    repetition_penalty, stop, seed), or from an object with those attributes (``modalink.engine.GenerationParams``)
    or such a message; keywords override. Missing values take GenerationParams' defaults; the gateway validates."""
    if isinstance(params, common_pb2.GenerationParams) and not kw:
        return params
    unknown = set(kw) - set(PARAM_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown generation parameter(s) {', '.join(sorted(unknown))}; "
                        f"expected {', '.join(PARAM_DEFAULTS)}")  # fmt: skip
    values = dict(PARAM_DEFAULTS)
    if isinstance(params, common_pb2.GenerationParams):
        values.update({k: getattr(params, k) for k in PARAM_DEFAULTS if k != "seed"})
        values["seed"] = params.seed if params.HasField("seed") else None
    elif params is not None:
        values.update({k: getattr(params, k) for k in PARAM_DEFAULTS if hasattr(params, k)})
    values.update(kw)
    seed = values.pop("seed")
    values["stop"] = [values["stop"]] if isinstance(values["stop"], str) else list(values["stop"])
    msg = common_pb2.GenerationParams(**values)
    if seed is not None:
        msg.seed = seed
    return msg
