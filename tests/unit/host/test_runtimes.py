"""Unit tests for rgrid.host.runtimes: no Docker, no mmdebstrap run."""

from __future__ import annotations

from pathlib import Path

import pytest

from rgrid.core.errors import BuildError, RGridError, UnknownRuntime
from rgrid.host.runtimes import (
    DEFAULT_RUNTIME,
    INCLUDE_PACKAGES,
    RUNTIMES,
    RuntimeSpec,
    failure_summary,
    find_apt_sources,
    import_changes,
    mmdebstrap_command,
    resolve_runtime,
)

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


@pytest.fixture
def spec() -> RuntimeSpec:
    return resolve_runtime("python:3.11")


def test_default_runtime_is_known() -> None:
    assert DEFAULT_RUNTIME in RUNTIMES


def test_resolve_known_runtime(spec: RuntimeSpec) -> None:
    assert spec.name == "python:3.11"
    assert spec.image == "rgrid-runtime:python-3.11"
    assert (spec.repository, spec.tag) == ("rgrid-runtime", "python-3.11")
    assert spec.suite == "bookworm"
    assert spec.python_version == "3.11"


def test_runtime_spec_is_frozen(spec: RuntimeSpec) -> None:
    with pytest.raises(AttributeError):
        spec.image = "other:tag"  # type: ignore[misc]


def test_unknown_runtime_is_a_one_line_user_error() -> None:
    with pytest.raises(UnknownRuntime) as info:
        resolve_runtime("python:2.7")
    err = info.value
    assert isinstance(err, RGridError)
    assert "\n" not in err.message
    assert "'python:2.7'" in err.message
    for name in RUNTIMES:
        assert name in err.message
    assert err.message == "unknown runtime 'python:2.7' (known: python:3.11)"


def test_alias_is_not_accepted() -> None:
    with pytest.raises(UnknownRuntime):
        resolve_runtime("python3.11")


def test_mmdebstrap_command(spec: RuntimeSpec, tmp_path: Path) -> None:
    sources = tmp_path / "debian.sources"
    out = tmp_path / "rootfs.tar"
    argv = mmdebstrap_command(spec, sources, out, mode="root")

    assert argv[0] == "mmdebstrap"
    assert "--variant=minbase" in argv
    assert "--mode=root" in argv
    includes = [a for a in argv if a.startswith("--include=")]
    assert len(includes) == 1
    assert set(includes[0].removeprefix("--include=").split(",")) == {"python3", "ca-certificates"}
    assert set(INCLUDE_PACKAGES) == {"python3", "ca-certificates"}
    # Positional SUITE TARGET MIRROR: the mirror is the sources file, never a URL.
    assert argv[-3:] == ["bookworm", str(out), str(sources)]
    assert not any("://" in a for a in argv)
    for path in ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*"):
        assert f"--dpkgopt=path-exclude={path}" in argv


def test_mmdebstrap_command_copyright_is_optional(spec: RuntimeSpec, tmp_path: Path) -> None:
    keep = "--dpkgopt=path-include=/usr/share/doc/*/copyright"
    assert keep in mmdebstrap_command(spec, tmp_path / "s", tmp_path / "o.tar")
    dropped = mmdebstrap_command(spec, tmp_path / "s", tmp_path / "o.tar", keep_copyright=False)
    assert keep not in dropped


def test_mmdebstrap_command_customize_hook(spec: RuntimeSpec, tmp_path: Path) -> None:
    argv = mmdebstrap_command(spec, tmp_path / "s", tmp_path / "o.tar", mode="unshare")
    assert "--mode=unshare" in argv
    hooks = [a.removeprefix("--customize-hook=") for a in argv if a.startswith("--customize")]
    assert len(hooks) == 1
    hook = hooks[0]
    assert "--uid 1000 --gid 1000 --home-dir /home/rgrid" in hook
    assert "install -d -o 1000 -g 1000 -m 0755 /work" in hook
    assert '"3.11"' in hook


def test_import_changes(spec: RuntimeSpec) -> None:
    changes = import_changes(spec)
    for expected in (
        "ENV PYTHONUNBUFFERED=1",
        "ENV PYTHONDONTWRITEBYTECODE=1",
        "ENV LANG=C.UTF-8",
        "ENV HOME=/home/rgrid",
        "WORKDIR /work",
        "USER 1000:1000",
        'CMD ["python3"]',
        'LABEL rgrid.runtime="python:3.11"',
    ):
        assert expected in changes


def test_find_apt_sources_prefers_deb822(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    (tmp_path / "sources.list").write_text("deb http://deb.debian.org/debian bookworm main\n")
    assert find_apt_sources("bookworm", tmp_path) == tmp_path / "sources.list.d" / "debian.sources"


def test_find_apt_sources_skips_files_without_the_suite(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "aaa.sources").write_text(
        "Types: deb\nURIs: https://example.invalid/repo\nSuites: nodistro\nComponents: main\n"
    )
    (tmp_path / "sources.list").write_text(
        "# deb http://deb.debian.org/debian bookworm main\n"
        "deb http://deb.debian.org/debian bookworm main\n"
    )
    assert find_apt_sources("bookworm", tmp_path) == tmp_path / "sources.list"


def test_find_apt_sources_ignores_comments_and_longer_names(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "# deb http://deb.debian.org/debian bookworm main\n"
        "deb http://deb.debian.org/debian bookwormish main\n"
    )
    with pytest.raises(BuildError) as info:
        find_apt_sources("bookworm", tmp_path)
    assert "'bookworm'" in info.value.message
    assert "\n" not in info.value.message


def test_failure_summary_names_cause_and_last_line() -> None:
    lines = [
        "I: running apt-get update...",
        "E: Unable to locate package nope",
        "E: setup failed: E: apt-get ... failed",
        "E: mmdebstrap failed to run",
    ]
    assert failure_summary(lines) == (
        "E: Unable to locate package nope; last line: E: mmdebstrap failed to run"
    )
    assert failure_summary(["I: a", "boom"]) == "boom"
    assert failure_summary([]) == "no output"
