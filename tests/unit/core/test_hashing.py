import io

from rgrid.core import cache_keys
from rgrid.core.hashing import script_hash, sha256_chunks, sha256_file, sha256_stream

#: FIPS 180-2's test vector: sha256 of b"abc".
ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_script_hash_is_sha256_of_the_exact_bytes_as_lowercase_hex():
    assert script_hash(b"abc") == ABC
    assert script_hash(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_whitespace_and_line_endings_matter():
    base = script_hash(b"print('hi')\n")
    variants = {b"print('hi') \n", b"print('hi')\r\n", b"print('hi')", b"print( 'hi')\n"}
    assert len({script_hash(v) for v in variants} | {base}) == len(variants) + 1


def test_a_stream_is_hashed_in_chunks_and_handed_on_while_it_is_read(tmp_path):
    # Larger than one chunk and not a multiple of it: the digest must not depend on reads.
    data = b"abc" * (1024 * 1024) + b"tail"
    path = tmp_path / "blob"
    path.write_bytes(data)
    copy = io.BytesIO()
    chunks: list[int] = []
    assert sha256_stream(io.BytesIO(data), copy.write) == (script_hash(data), len(data))
    assert copy.getvalue() == data
    assert sha256_file(path, lambda chunk: chunks.append(len(chunk))) == (
        script_hash(data),
        len(data),
    )
    assert len(chunks) == 4 and sum(chunks) == len(data)
    assert sha256_chunks([b"a", b"", b"bc"]) == (ABC, 3)


def test_dependency_key_depends_on_every_part():
    key = cache_keys.dependency_cache_key(1, "python:3.11", "d" * 64)
    others = {
        cache_keys.dependency_cache_key(2, "python:3.11", "d" * 64),
        cache_keys.dependency_cache_key(1, "python:3.12", "d" * 64),
        cache_keys.dependency_cache_key(1, "python:3.11", "e" * 64),
    }
    assert key not in others and len(others) == 3


def test_environment_name_is_per_account_and_per_resolved_set():
    name = cache_keys.environment_name(1, "r" * 64)
    assert len(name) == 32 and name.isalnum()
    assert cache_keys.environment_name(2, "r" * 64) != name
    assert cache_keys.environment_name(1, "q" * 64) != name
