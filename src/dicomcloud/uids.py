"""UID rules (PS3.5 9.1) and the stable UID hash of the reference design.

A UID becomes a path segment (storage layout), so it is validated before any use: digits
and dots only, components without leading zeros, at most 64 characters. Nothing else ever
reaches the file system, which is what keeps ``../`` out of paths.
"""

from __future__ import annotations

import hashlib
import re
from typing import NewType

StudyUID = NewType("StudyUID", str)
SeriesUID = NewType("SeriesUID", str)
SopUID = NewType("SopUID", str)

# PS3.5 9.1: components of digits, no leading zero unless the component is "0".
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_LAX_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(value: object, *, strict: bool = False) -> bool:
    """True when ``value`` is a syntactically valid UID (PS3.5 9.1).

    Args:
        value: the candidate.
        strict: also refuse components with a leading zero. Real equipment emits such
            UIDs, so ingest accepts them (they are still safe as paths); we never create one.
    """
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        return False
    return bool((_UID_RE if strict else _LAX_UID_RE).match(value))


def uid_hash(uid: str) -> str:
    """Stable 64-bit hash of a UID as a decimal string of at most 20 characters.

    ``study_uid_hash`` and ``series_uid_hash`` of DESIGN.md. BLAKE2b is stable across
    processes and platforms (unlike ``hash()``) and fast.
    """
    digest = hashlib.blake2b(uid.encode("ascii"), digest_size=8).digest()
    return str(int.from_bytes(digest, "big"))
