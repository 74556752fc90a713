"""The JSON text the databases store (journal bodies, cue explanations, contexts, predictive labels and models):
one encoder for all.

Columns hold real JSON, so SQLite's and PostgreSQL's json functions can read them: NaN and infinities are
refused (``allow_nan=False``), as the stdlib encoder refuses them. msgspec writes the same JSON ~6-10x faster
(issue 13: the stdlib's C encoder was ~1.2 us of a batched signal's ~5, half of it float repr; a cue's
explanation passes here on every offer). Numbers may be spelled differently (1e16, not 1e+16): the same values
for every JSON reader. msgspec writes NaN and infinities as null where the stdlib raises, so a text with a
null in it is encoded again by the stdlib, which decides as before; so is anything msgspec cannot encode.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import msgspec

__all__ = ["dumps"]


def _mapping(value: object) -> dict[str, Any]:
    """A read-only mapping (the core's shared empty properties) as JSON: the encoders ask only for these."""
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# Built once: json.dumps with options constructs an encoder per call.
_stdlib_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_mapping).encode
_fast_encode = msgspec.json.Encoder(enc_hook=_mapping).encode
_NULL = b"null"


def dumps(value: object) -> str:
    """``value`` as compact JSON text (UTF-8, not \\u escapes); ValueError for NaN or an infinity."""
    try:
        encoded = _fast_encode(value)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
        return _stdlib_dumps(value)
    if _NULL in encoded:
        return _stdlib_dumps(value)
    return encoded.decode()
