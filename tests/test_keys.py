"""API keys: stored hashed, verified in constant time, legacy raw keys still work."""

from govdb.keys import generate_api_key, hash_api_key, verify_api_key


def test_hash_hides_the_key_and_verifies():
    key = generate_api_key()
    stored = hash_api_key(key)
    assert key not in stored and stored.startswith("sha256$")
    assert verify_api_key(key, stored)
    assert not verify_api_key(key[:-1], stored)
    assert hash_api_key(stored) == stored  # already hashed: kept, not hashed twice


def test_legacy_raw_key_verifies():
    assert verify_api_key("raw-legacy-key", "raw-legacy-key")
    assert not verify_api_key("raw-legacy-kez", "raw-legacy-key")


def test_keys_are_unique_and_long():
    keys = {generate_api_key() for _ in range(100)}
    assert len(keys) == 100 and min(map(len, keys)) >= 40
