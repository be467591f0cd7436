import io

from rgrid import cache_keys
from rgrid.hashing import script_hash, sha256_file, sha256_stream


def test_script_hash_is_deterministic():
    assert script_hash(b"print('hi')\n") == script_hash(b"print('hi')\n")


def test_whitespace_matters():
    base = script_hash(b"print('hi')\n")
    assert script_hash(b"print('hi') \n") != base
    assert script_hash(b"print('hi')\r\n") != base
    assert script_hash(b"print('hi')") != base


def test_non_ascii_is_hashed_as_utf8_bytes():
    text = "print('héllo, 世界')\n"
    assert script_hash(text.encode()) == script_hash(text.encode("utf-8"))
    assert script_hash(text.encode()) != script_hash(text.encode("utf-16"))


def test_empty_script_has_the_well_known_sha256():
    assert script_hash(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_stream_and_file_agree_with_bytes(tmp_path):
    data = b"x" * (3 * 1024 * 1024 + 17)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_stream(io.BytesIO(data)) == (script_hash(data), len(data))
    assert sha256_file(path) == (script_hash(data), len(data))


def test_dependency_key_depends_on_every_part():
    key = cache_keys.dependency_cache_key(1, "python:3.11", "d" * 64)
    assert key == cache_keys.dependency_cache_key(1, "python:3.11", "d" * 64)
    others = {
        cache_keys.dependency_cache_key(2, "python:3.11", "d" * 64),
        cache_keys.dependency_cache_key(1, "python:3.12", "d" * 64),
        cache_keys.dependency_cache_key(1, "python:3.11", "e" * 64),
    }
    assert key not in others and len(others) == 3


def test_environment_name_is_per_account_and_per_resolved_set():
    name = cache_keys.environment_name(1, "r" * 64)
    assert name == cache_keys.environment_name(1, "r" * 64)
    assert len(name) == 32 and name.isalnum()
    assert cache_keys.environment_name(2, "r" * 64) != name
    assert cache_keys.environment_name(1, "q" * 64) != name
