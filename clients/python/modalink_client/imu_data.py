"""IMU windows from files, checked (numpy only): what ``modalink``'s IMU encoder accepts, read the same way by a
client before it sends one (the playground plots it first) and by the encoder service when one arrives.

A .npy file's header is checked against the bytes that follow it before anything is allocated, and nothing is ever
unpickled; CSV is numeric text, one row per channel or per time step.
"""

from __future__ import annotations

import io
import math

import numpy as np

MIN_STEPS, MAX_STEPS = 16, 100_000


class _Refused(ValueError):
    """A refusal that already says what is wrong (not wrapped in the generic "must be .npy or CSV")."""


def load_npy(raw: bytes, what: str = "IMU", ndim: int | None = 2, axes: str = " [channels, time]") -> np.ndarray:
    """A .npy array of numbers and ``ndim`` axes whose header is checked against the bytes that follow it before
    anything is allocated (``np.load`` allocates the header's shape first: a 100-byte file could ask for
    terabytes); never unpickled (``ndim`` None: any). ValueError says what is wrong (``what`` names the input)."""
    f = io.BytesIO(raw)
    try:  # numpy parses the header dict with tokenize and ast: errors of several types on a corrupt one
        version = np.lib.format.read_magic(f)
        fmt = np.lib.format
        shape, fortran, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)
    except Exception:  # noqa: BLE001
        raise _Refused(f"{what} .npy header is corrupt") from None  # its words may quote the file: not echoed
    if dtype.hasobject or dtype.kind not in "fiu":
        raise _Refused(f"{what} .npy must hold numbers, got dtype {dtype}")
    if ndim is not None and len(shape) != ndim:
        raise _Refused(f"{what} data must be {ndim}-D{axes}, got shape {list(shape)}")
    if math.prod(shape) * dtype.itemsize != len(raw) - f.tell():
        raise _Refused(f"{what} .npy header says shape {list(shape)} of {dtype}, which does not match its "
                         f"{len(raw) - f.tell()} data bytes")  # fmt: skip
    return np.frombuffer(raw, dtype, offset=f.tell()).reshape(shape, order="F" if fortran else "C").copy()


CSV_VALUE_BYTES = 32  # a number in a CSV window, with its separator, at most


def imu_array(data: bytes | np.ndarray, channels: int = 6, name: str = "") -> np.ndarray:
    """float32 [channels, time] from .npy bytes, numeric CSV text (rows may be time steps) or an array, checked:
    ``channels`` rows, ``MIN_STEPS``..``MAX_STEPS`` time steps, finite values. ``name``: the file's name, if any
    (a ``.npy`` name without the .npy magic is a corrupt file, not CSV). ValueError says what is wrong."""
    if isinstance(data, np.ndarray):
        arr = data
    else:
        if not data:
            raise ValueError("IMU is empty (0 bytes)")
        try:
            if data[:6] == b"\x93NUMPY":
                arr = load_npy(data)
            elif name.endswith(".npy"):
                raise _Refused("IMU .npy file is corrupt (bad header)")
            else:
                if len(data) > (limit := channels * MAX_STEPS * CSV_VALUE_BYTES):  # bounded before parsing
                    raise _Refused(f"IMU CSV is {len(data)} bytes; a window of {channels} channels and at most "
                                   f"{MAX_STEPS} time steps fits in {limit}")  # fmt: skip
                arr = np.loadtxt(io.StringIO(data.decode("utf-8")), delimiter=",", dtype=np.float32, ndmin=2)
        except _Refused:
            raise
        except (ValueError, UnicodeDecodeError, EOFError, OSError, SyntaxError):
            # the parser's own words quote the file's text, which must not travel back (job rows, responses)
            raise ValueError("IMU data must be .npy or numeric CSV [channels, time] (this is neither)") from None
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"IMU data must be numeric, got dtype {arr.dtype}")
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"IMU data must be 2-D [channels, time], got shape {list(arr.shape)}")
    if arr.shape[0] != channels and arr.shape[1] == channels:
        arr = arr.T  # [time, channels] as CSV files usually store it
    if arr.shape[0] != channels:
        raise ValueError(f"IMU data must have {channels} channels, got shape {list(arr.shape)}")
    if not MIN_STEPS <= arr.shape[1] <= MAX_STEPS:
        raise ValueError(f"IMU window must have {MIN_STEPS}..{MAX_STEPS} time steps, got {arr.shape[1]}")
    if not np.isfinite(arr).all():
        raise ValueError("IMU data contains NaN or Inf")
    return np.ascontiguousarray(arr)
