"""The import scan: which local files a script's closure holds (real files under tmp_path)."""

import pytest

from rgrid.client.sources import collect_sources, project_root
from rgrid.core.config import Settings
from rgrid.core.errors import BadInput


def _write(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _names(tree) -> list[str]:
    return sorted(item.name for item in tree.files)


def test_closure_follows_packages_namespaces_submodules_and_skips_installed(tmp_path):
    _write(
        tmp_path,
        {
            "pyproject.toml": "[project]\nname='x'\n",
            "app/main.py": "import json, os\nimport ns.leaf\nfrom pkg import sub\n"
            "from pkg.deep import inner\nimport vendored\n",
            "app/ns/leaf.py": "from . import sibling\n",
            "app/ns/sibling.py": "",
            "app/pkg/__init__.py": "",
            "app/pkg/sub.py": "from .deep.inner import X\n",
            "app/pkg/deep/__init__.py": "",
            "app/pkg/deep/inner.py": "X = 1\nfrom .. import sub\n",
            "app/pkg/unused.py": "",
            "app/.venv/lib/vendored.py": "",
            "app/vendored/__init__.py": "",
        },
    )
    (tmp_path / "app" / ".venv" / "vendored.py").write_text("")
    tree = collect_sources(tmp_path / "app" / "main.py", Settings())
    assert tree.root == tmp_path and tree.entry == "app/main.py"
    assert _names(tree) == [
        "app/ns/leaf.py",
        "app/ns/sibling.py",
        "app/pkg/__init__.py",
        "app/pkg/deep/__init__.py",
        "app/pkg/deep/inner.py",
        "app/pkg/sub.py",
        "app/vendored/__init__.py",
    ]


def test_project_root_is_the_nearest_marker_else_the_scripts_folder(tmp_path):
    _write(tmp_path, {"a/.git/HEAD": "", "a/b/c/s.py": "", "x/s.py": ""})
    assert project_root(tmp_path / "a" / "b" / "c" / "s.py") == tmp_path / "a"
    assert project_root(tmp_path / "x" / "s.py") == tmp_path / "x"


def test_syntax_errors_are_left_for_run_time_and_bounds_hold(tmp_path):
    _write(tmp_path, {"s.py": "import broken\n", "broken.py": "def (:\n"})
    assert _names(collect_sources(tmp_path / "s.py", Settings())) == ["broken.py"]
    with pytest.raises(BadInput, match="RGRID_MAX_SOURCE_FILES"):
        collect_sources(tmp_path / "s.py", Settings(max_source_files=1))


def test_a_uv_lock_is_sent_as_its_pins_marked_as_the_whole_resolution(tmp_path):
    """The lock's export goes with ``--locked`` first: the worker installs those pins and
    runs no resolver (rgrid.host.dependencies.is_locked); the normalised key keeps the mark."""
    import subprocess

    from uv import find_uv_bin

    from rgrid.client.sources import project_dependencies
    from rgrid.host.dependencies import is_locked
    from rgrid.host.requirements import normalise
    from tests.wheels import make_wheel

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "lockdep", "1.0")
    (tmp_path / "main.py").write_text("import lockdep\n")
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "p"\nversion = "0"\nrequires-python = ">=3.11"\n'
        f'dependencies = ["lockdep"]\n\n[tool.uv]\nfind-links = [{str(wheels)!r}]\n'
    )
    locked = subprocess.run(
        [find_uv_bin(), "lock", "--offline", "--quiet"], cwd=tmp_path, capture_output=True
    )
    assert locked.returncode == 0, locked.stderr
    found = project_dependencies(tmp_path / "main.py", "import lockdep\n", tmp_path)
    assert found.source == "uv.lock"
    normalised = normalise(found.requirements)
    assert is_locked(normalised)
    assert [line for line in normalised.splitlines() if not line.startswith("-")] == [
        "lockdep==1.0"
    ]
    assert not is_locked(normalise("lockdep==1.0\n"))


def test_imports_nested_in_functions_classes_and_handlers_are_found(tmp_path):
    """The scan visits statements only, nested ones included."""
    _write(
        tmp_path,
        {
            "main.py": "class C:\n    def f(self):\n        try:\n            pass\n"
            "        except ImportError:\n            import in_handler\n"
            "        else:\n            if True:\n                from in_else import x\n"
            "def g(v):\n    match v:\n        case 1:\n            import in_case\n"
            "with open('f') as fh:\n    import in_with\n",
            "in_handler.py": "",
            "in_else.py": "x = 1\n",
            "in_case.py": "",
            "in_with.py": "",
            "leaf_never.py": "",
        },
    )
    tree = collect_sources(tmp_path / "main.py", Settings())
    assert _names(tree) == ["in_case.py", "in_else.py", "in_handler.py", "in_with.py"]
