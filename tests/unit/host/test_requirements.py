import pytest

from rgrid.core.cache_keys import EMPTY_DEPENDENCY_HASH
from rgrid.core.errors import BadInput
from rgrid.host.requirements import (
    dependency_hash,
    inline_requirements,
    normalise,
    read_requirements_file,
)


def test_order_case_comments_and_whitespace_do_not_change_the_hash():
    a = "requests==2.31.0\n# a comment\n\nNumPy>=1.26  # inline comment\n"
    b = "  numpy>=1.26\nRequests==2.31.0   \n"
    assert normalise(a) == normalise(b) == "numpy>=1.26\nrequests==2.31.0\n"
    assert dependency_hash(normalise(a)) == dependency_hash(normalise(b))


def test_pep503_names_are_normalised():
    assert normalise("Foo_Bar.baz==1.0\n") == "foo-bar-baz==1.0\n"
    assert normalise("zope.interface[TEST,Docs]\n") == "zope-interface[docs,test]\n"


def test_a_changed_pin_is_a_different_hash():
    assert dependency_hash(normalise("six==1.16.0\n")) != dependency_hash(
        normalise("six==1.17.0\n")
    )


def test_options_are_part_of_the_key_and_spelled_one_way():
    plain = normalise("six\n")
    with_index = normalise("-i https://example.invalid/simple\nsix\n")
    assert with_index == "--index-url https://example.invalid/simple\nsix\n"
    assert dependency_hash(plain) != dependency_hash(with_index)
    assert normalise("--index-url=https://example.invalid/simple\nsix\n") == with_index
    assert normalise("-f /wheels\n") == "--find-links /wheels\n"


def test_empty_requirements_hash_like_no_requirements():
    assert dependency_hash(normalise("# nothing\n\n")) == EMPTY_DEPENDENCY_HASH


def test_markers_and_urls_survive():
    text = "pkg @ https://host.invalid/pkg-1.0-py3-none-any.whl#sha256=abc\n"
    assert normalise(text) == text
    assert normalise('six ; python_version >= "3.8"\n') == 'six ; python_version >= "3.8"\n'


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("numpy >> 1", "not a valid requirement"),
        ("-c constraints.txt", "constraint files"),
        ("-e ./mypkg", "editable installs"),
        ("--no-deps", "unsupported option"),
        ("pkg @ file:///home/me/pkg", "only http"),
        ("pkg @ FILE:///home/me/pkg", "only http"),
        ("pkg @ /abs/pkg.whl", "only http"),
        ("--index-url /srv/simple", "must be an http"),
    ],
)
def test_bad_lines_are_refused_with_their_line_number(line, message):
    with pytest.raises(BadInput, match=message) as info:
        normalise(f"six\n{line}\n")
    assert "line 2" in info.value.message


def test_nested_includes_are_resolved_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.txt").write_text("six==1.16.0\n")
    (tmp_path / "req.txt").write_text("-r sub/base.txt\nattrs\n")
    assert normalise(read_requirements_file(tmp_path / "req.txt")) == "attrs\nsix==1.16.0\n"


def test_include_loops_and_missing_files_are_refused(tmp_path):
    (tmp_path / "a.txt").write_text("-r b.txt\n")
    (tmp_path / "b.txt").write_text("-r a.txt\n")
    with pytest.raises(BadInput, match="include loop"):
        read_requirements_file(tmp_path / "a.txt")
    with pytest.raises(BadInput, match="not found"):
        read_requirements_file(tmp_path / "missing.txt")


PEP723 = """\
# /// script
# requires-python = ">=3.10"
# dependencies = [
#   "Six==1.16.0",
#   "attrs",
# ]
# ///
import six
"""


def test_inline_script_metadata():
    assert normalise(inline_requirements(PEP723, "3.11")) == "attrs\nsix==1.16.0\n"
    assert inline_requirements("print('no metadata')\n", "3.11") is None


def test_inline_metadata_requires_python_is_checked():
    with pytest.raises(BadInput, match="requires Python >=3.12"):
        inline_requirements(PEP723.replace(">=3.10", ">=3.12"), "3.11")


def test_inline_metadata_must_be_valid_toml():
    with pytest.raises(BadInput, match="not valid TOML"):
        inline_requirements("# /// script\n# dependencies = [\n# ///\n", "3.11")


TOOL_UV = """\
# /// script
# dependencies = ["six"]
# [tool.uv]
# exclude-newer = "2021-06-01T00:00:00Z"
# ///
"""


def test_inline_tool_uv_settings_are_honoured_as_part_of_the_key():
    text = normalise(inline_requirements(TOOL_UV, "3.11"))
    assert text == "--exclude-newer 2021-06-01T00:00:00Z\nsix\n"
    assert dependency_hash(text) != dependency_hash(normalise("six\n"))


def test_unsupported_inline_tool_uv_settings_are_refused_not_ignored():
    script = TOOL_UV.replace("# exclude-newer", "# prerelease = 'allow'\n# exclude-newer")
    with pytest.raises(BadInput, match="'prerelease' is not supported"):
        inline_requirements(script, "3.11")


def test_local_find_links_only_where_the_operator_allows():
    from rgrid.host.requirements import check_local_paths

    text = normalise("--find-links /srv/wheels\nsix\n")
    with pytest.raises(BadInput, match="not allowed here"):
        check_local_paths(text, allowed=False)
    check_local_paths(text, allowed=True)
    check_local_paths(normalise("--find-links https://wheels.invalid/\nsix\n"), allowed=False)
