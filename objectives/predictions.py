"""Per-example predictions stored compactly in a trial's user attributes, for the paired test-set
comparisons: "u8:" + base64 of the uint8 array (uint16 beyond 256 labels), 4 KB for Banking77's
3,080 test examples where a JSON list would take 10 KB.
"""

from __future__ import annotations

import base64

import numpy as np

_DTYPES = {"u8": np.dtype("<u1"), "u16": np.dtype("<u2")}


def encode_labels(values: np.ndarray) -> str:
    """Label ids (non-negative ints) as a short ASCII string."""
    values = np.asarray(values)
    if values.size and (values.min() < 0 or values.max() >= 2**16):
        raise ValueError("label ids must lie in 0..65535")
    tag = "u8" if not values.size or values.max() < 256 else "u16"
    return f"{tag}:" + base64.b64encode(values.astype(_DTYPES[tag]).tobytes()).decode("ascii")


def decode_labels(text: object) -> np.ndarray | None:
    """The array `encode_labels` wrote, or None for anything else (missing, older, malformed)."""
    if not isinstance(text, str) or ":" not in text:
        return None
    tag, _, payload = text.partition(":")
    if tag not in _DTYPES:
        return None
    try:
        raw = base64.b64decode(payload, validate=True)
        return np.frombuffer(raw, dtype=_DTYPES[tag]).astype(np.int64)
    except ValueError:
        return None
