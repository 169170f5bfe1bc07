"""API keys: generate, hash for storage, verify in constant time.

Keys are 256-bit random tokens, so one SHA-256 is enough to store them
safely (no slow KDF is needed against guessing). Stored form:
``sha256$<hex>``. A stored value without that prefix is a legacy raw key
from an old SQLite file; it still verifies, also in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

PREFIX = "sha256$"


def generate_api_key() -> str:
    """Return a new random key (shown to the agent once, never stored raw)."""
    return "gk_" + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """Return the stored form of ``key``; a value already hashed is kept."""
    if is_hashed(key):
        return key
    return PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def is_hashed(stored: str) -> bool:
    return stored.startswith(PREFIX) and len(stored) == len(PREFIX) + 64


def verify_api_key(candidate: str, stored: str) -> bool:
    """Return True when ``candidate`` matches ``stored`` (hashed or legacy raw)."""
    expected = stored if is_hashed(stored) else hash_api_key(stored)
    return hmac.compare_digest(hash_api_key(candidate).encode(), expected.encode())
