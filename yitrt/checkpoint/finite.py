"""Non-finite values (NaN, ±Inf) in raw tensor bytes, found from the exponent bits alone.

A floating-point value is NaN or infinite exactly when its exponent field is all ones; with the sign bit masked
off, that is "magnitude bits >= the all-ones exponent". One AND and one max over a buffer (numpy, several GB/s,
faster than hashing the same bytes) answers it without decoding a single value, so the check can ride along with
passes the converter makes anyway (the in-memory chunks it transforms, the output it hashes).
"""

from __future__ import annotations

#: safetensors dtype code → (unsigned view width in bytes, magnitude mask, smallest non-finite magnitude).
#: IEEE binary16/32/64 and bfloat16: exponent all ones. float8_e5m2 is IEEE-like (Inf and NaN); float8_e4m3fn
#: has no Inf and one NaN magnitude, S.1111.111 (OCP 8-bit floating point spec, "E4M3" column).
NONFINITE_BITS: dict[str, tuple[int, int, int]] = {
    "BF16": (2, 0x7FFF, 0x7F80),
    "F16": (2, 0x7FFF, 0x7C00),
    "F32": (4, 0x7FFF_FFFF, 0x7F80_0000),
    "F64": (8, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
    "F8_E5M2": (1, 0x7F, 0x7C),
    "F8_E4M3": (1, 0x7F, 0x7F),
}

_UINTS = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}


def can_hold_nonfinite(code: str) -> bool:
    """Whether a dtype has NaN/Inf encodings (floating point); integers and bools never do."""
    return code in NONFINITE_BITS


def first_nonfinite(data, code: str) -> int | None:
    """Index of the first NaN/Inf element of raw little-endian bytes of dtype ``code``, or None.

    Args:
        data: a buffer (bytes, memoryview, numpy array) holding whole elements.
        code: safetensors dtype code; dtypes without NaN/Inf give None.
    """
    if code not in NONFINITE_BITS:
        return None
    import numpy as np

    width, mask, floor = NONFINITE_BITS[code]
    view = np.frombuffer(data, dtype=_UINTS[width])
    if not view.size:
        return None
    magnitude = np.bitwise_and(view, mask)
    if magnitude.max() < floor:
        return None
    return int(np.argmax(magnitude >= floor))


def has_nonfinite(data, code: str) -> bool:
    """Whether raw bytes of dtype ``code`` hold a NaN or an infinity (see ``first_nonfinite``)."""
    return first_nonfinite(data, code) is not None


def tensor_code(tensor) -> str | None:
    """The safetensors dtype code of a torch tensor (None for dtypes safetensors has no code for)."""
    from yitrt.checkpoint.safetensors_io import CODES

    return CODES.get(str(tensor.dtype).removeprefix("torch."))


def tensor_has_nonfinite(tensor) -> bool:
    """Whether a torch tensor (CPU or CUDA) holds a NaN or an infinity. CPU tensors are checked on their bits
    (numpy; torch's own isfinite is ~40x slower on bfloat16 here), CUDA tensors on the device."""
    import torch

    if not tensor.is_floating_point() or tensor.numel() == 0:
        return False
    if tensor.device.type != "cpu":
        return not bool(torch.isfinite(tensor).all())
    code = tensor_code(tensor)
    if code not in NONFINITE_BITS:
        return not bool(torch.isfinite(tensor).all())
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return has_nonfinite(raw, code)
