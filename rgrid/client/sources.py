"""The CLI's side of a script's source tree: the local modules it imports, found statically.

``rgrid run main.py`` ships the entry script and every module or package under the project
root that it imports, transitively, at their paths relative to that root, so that they import
in the sandbox as they do with ``python main.py``. The scan reads ``import`` and
``from ... import`` statements with the standard library's ``ast``, as ``modulefinder`` does,
without running anything; a module is local when its file is under the project root and not
inside an installed environment there (``.venv/``, ``site-packages``). Imports that resolve to
the standard library or an installed package are not shipped. A dynamic import the scan cannot
see is added with ``--with-module``.
"""

from __future__ import annotations

import ast
import os
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from rgrid.core.config import Settings
from rgrid.core.errors import BadInput
from rgrid.store.inputs import InputFile

#: What marks a project root, looking upward from the script's folder (as uv finds a project).
ROOT_MARKERS = ("pyproject.toml", ".git")
#: Folders under the root that hold installed packages, never the project's own modules.
SKIPPED_PARTS = frozenset({".venv", "venv", "site-packages", "dist-packages", "__pycache__"})


def project_root(script: Path) -> Path:
    """The nearest folder upward from the script's own holding ``pyproject.toml`` or
    ``.git``; else the script's folder."""
    folder = script.resolve().parent
    for candidate in (folder, *folder.parents):
        if any((candidate / marker).exists() for marker in ROOT_MARKERS):
            return candidate
    return folder


@dataclass
class SourceTree:
    """The entry script's path relative to the root, and every other shipped file."""

    root: Path
    entry: str
    files: list[InputFile]

    @property
    def size(self) -> int:
        return sum(item.size for item in self.files)


class _Scanner:
    def __init__(self, root: Path, search: list[Path], settings: Settings):
        self.root = root
        self.search = search
        self.settings = settings
        self.found: dict[str, Path] = {}  # relative path -> file
        self.pending: list[tuple[Path, str | None]] = []  # (file, its package or None)

    def _local(self, path: Path) -> str | None:
        """The path relative to the root if it is a project file to ship, else None."""
        try:
            relative = path.absolute().relative_to(self.root)
        except ValueError:
            return None
        if SKIPPED_PARTS.intersection(relative.parts):
            return None
        if path.is_symlink() and not path.resolve().is_relative_to(self.root):
            raise BadInput(f"module {relative.as_posix()} is a link pointing outside the project")
        return relative.as_posix()

    def add(self, path: Path, package: str | None) -> None:
        relative = self._local(path)
        if relative is None or relative in self.found:
            return
        self.found[relative] = path
        if len(self.found) > self.settings.max_source_files:
            raise BadInput(
                f"the script imports more than {self.settings.max_source_files} local files"
                " (RGRID_MAX_SOURCE_FILES)"
            )
        if path.suffix == ".py":
            self.pending.append((path, package))

    def _package_inits(self, folder: Path, parts: list[str]) -> None:
        """The ``__init__.py`` of every package on the way to a module: importing ``a.b.c``
        runs ``a/__init__.py`` and ``a/b/__init__.py`` first."""
        for depth in range(1, len(parts) + 1):
            init = folder.joinpath(*parts[:depth], "__init__.py")
            if init.is_file():
                self.add(init, ".".join(parts[:depth]))

    def resolve(self, name: str, bases: list[Path] | None = None) -> bool:
        """Find module ``name`` (dotted) on the search path (or under ``bases`` for a relative
        import); adds what it finds. False when it is not a local module."""
        parts = name.split(".")
        for base in bases if bases is not None else self.search:
            target = base.joinpath(*parts)
            module = target.with_suffix(".py") if parts else None
            if target.is_dir():
                if bases is None:
                    self._package_inits(base, parts)
                init = target / "__init__.py"
                if init.is_file():
                    self.add(init, name)
                # A namespace package (no __init__.py) has nothing to run of its own.
                return True
            if module is not None and module.is_file():
                if bases is None:
                    self._package_inits(base, parts[:-1])
                self.add(module, ".".join(parts[:-1]) or None)
                return True
        return False

    def scan(self, path: Path, package: str | None) -> None:
        data = path.read_bytes()
        if b"import" not in data:
            return  # nothing to follow (and no parse: most of a project's modules are leaves)
        try:
            tree = ast.parse(data, filename=str(path))
        except (SyntaxError, ValueError):
            return  # the script's own error at run time, as locally
        folder = path.parent
        for node in _statements(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self.resolve(alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = folder
                    for _ in range(node.level - 1):
                        base = base.parent
                    stem = node.module.split(".") if node.module else []
                    target = base.joinpath(*stem)
                    if stem:
                        self.resolve(".".join(stem), [base])
                    for alias in node.names:  # from . import submodule
                        self.resolve(alias.name, [target])
                    self._inits_between(base, target)
                elif node.module and self.resolve(node.module):
                    for alias in node.names:  # from pkg import submodule
                        self.resolve(f"{node.module}.{alias.name}")

    def _inits_between(self, base: Path, target: Path) -> None:
        current = target
        while current != base and current.is_relative_to(base):
            init = current / "__init__.py"
            if init.is_file():
                self.add(init, None)
            current = current.parent

    def run(self) -> None:
        while self.pending:
            self.scan(*self.pending.pop())


def _statements(tree: ast.AST):
    """Every statement of a module, nested ones included (an import in a function, a class,
    an ``if``, a ``try``, a ``match`` case), without visiting expressions: ``import`` is a
    statement, and expressions are most of a module's nodes (``ast.walk`` of all of them was
    most of the CLI's scan of a 30-module project)."""
    pending = list(getattr(tree, "body", []))
    while pending:
        node = pending.pop()
        yield node
        for name in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, name, None)
            if isinstance(children, list):
                pending.extend(child for child in children if isinstance(child, ast.AST))


def module_file(module: str, cwd: Path) -> Path:
    """The file ``python -m MODULE`` runs from ``cwd`` (its first place to look): the module's
    ``.py``, or a package's ``__main__.py``."""
    if not all(part.isidentifier() for part in module.split(".")):
        raise BadInput(f"-m {module}: not a module name")
    target = cwd.joinpath(*module.split("."))
    for candidate in (target.with_suffix(".py"), target / "__main__.py"):
        if candidate.is_file():
            return candidate
    raise BadInput(f"-m {module}: no module {module} under {cwd} (a local module is needed)")


def collect_sources(
    script: Path,
    settings: Settings,
    with_modules: tuple[str, ...] = (),
    as_module: bool = False,
) -> SourceTree:
    """The script's source tree; BadInput (one line) for a link out of the project, a module
    named with ``--with-module`` that is not found, or a tree over its bounds. ``as_module``
    (``-m``): the tree is rooted at the working folder, which is where ``python -m`` looks."""
    root = Path.cwd().resolve() if as_module else project_root(script)
    script_abs = Path(os.path.abspath(script))
    if script_abs.is_symlink() and not script_abs.resolve().is_relative_to(root):
        raise BadInput(f"script {script} is a link pointing outside the project")
    try:
        entry = script_abs.relative_to(root).as_posix()
    except ValueError:
        entry = script_abs.name
        root = script_abs.parent
    # Where `python sub/main.py` looks for a local module: the script's own folder.
    search = [root] if as_module else [script_abs.parent]
    scanner = _Scanner(root, search, settings)
    scanner.found[entry] = script_abs
    scanner.pending.append((script_abs, None))
    for module in with_modules:
        path = (Path.cwd() / module) if module.endswith(".py") or "/" in module else None
        if path is not None and path.exists():
            if path.is_dir():
                for found in sorted(path.rglob("*.py")):
                    scanner.add(found, None)
            else:
                scanner.add(path, None)
            if scanner._local(path) is None:
                raise BadInput(f"--with-module {module} is not under the project root {root}")
        elif not scanner.resolve(module):
            raise BadInput(f"--with-module {module}: no such module under {root}")
    scanner.run()
    files = [
        InputFile(name=name, path=path, size=path.stat().st_size)
        for name, path in sorted(scanner.found.items())
        if name != entry
    ]
    tree = SourceTree(root=root, entry=entry, files=files)
    total = tree.size + script_abs.stat().st_size
    if total > settings.max_source_bytes:
        raise BadInput(
            f"the script's local modules total {total} bytes, over the limit of"
            f" {settings.max_source_bytes} (RGRID_MAX_SOURCE_BYTES)"
        )
    return tree


def entry_argv(entry: str) -> str:
    """Where the entry script sits in the sandbox."""
    return str(PurePosixPath("/work") / entry)


@dataclass
class ProjectDependencies:
    """What the script's dependencies are and where they were found: ``requirements`` None
    means the server reads them from the script itself (its PEP 723 block) or there are none."""

    requirements: str | None
    source: str | None  # "-r FILE", "script metadata", "uv.lock", "pyproject.toml", ...


def _uv_export(root: Path, extras: tuple[str, ...] = ()) -> str:
    """The lock's exact pins, as requirement lines with their markers (so the runtime's own
    Python and platform pick theirs at install), without resolving. ``--locked`` fails when
    the lock is out of date against pyproject.toml, as ``uv run --locked`` does."""
    import subprocess

    from rgrid.host.dependencies import uv_binary, uv_environment

    argv = [uv_binary(), "export", "--locked", "--no-hashes", "--no-header", "--no-annotate"]
    argv += ["--no-emit-project", "--format", "requirements-txt", "--offline", "--quiet"]
    for extra in extras:
        argv += ["--extra", extra]
    env = {**os.environ, **uv_environment()}

    # The export is the same whatever Python uv is given, but finding one can cost more than
    # the export (a pyenv shim on PATH: 0.33 s against 0.04 s, measured here); this one's
    # first. Only if that fails (a project asking for another Python, an out-of-date lock)
    # does uv search as it would itself, and its answer stands.
    def export(*more: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*argv, *more], cwd=root, capture_output=True, text=True, env=env, check=False
        )

    result = export("--python", sys.executable)
    if result.returncode != 0:
        result = export()
    if result.returncode != 0:
        reason = next(
            (line for line in result.stderr.splitlines() if "lock" in line.lower()),
            result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "uv failed",
        )
        raise BadInput(f"uv.lock in {root} is out of date or unreadable: {reason.strip()}")
    return result.stdout


def project_dependencies(
    script: Path, script_text: str, root: Path, extras: tuple[str, ...] = ()
) -> ProjectDependencies:
    """Where ``uv run`` finds a script's dependencies, in its order: a PEP 723 block in the
    script; else the project's ``pyproject.toml`` ``[project].dependencies`` (its optional
    groups only when asked), pinned by its ``uv.lock`` when there is one; else a
    ``requirements.txt`` beside the script. ``-r`` (handled by the caller) overrides all."""
    import tomllib

    from rgrid.host.requirements import inline_metadata, read_requirements_file

    if inline_metadata(script_text) is not None:
        return ProjectDependencies(None, "script metadata (# /// script)")
    pyproject = root / "pyproject.toml"
    if pyproject.is_file():
        try:
            project = tomllib.loads(pyproject.read_text()).get("project", {})
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise BadInput(f"{pyproject} is not valid TOML: {exc}") from exc
        deps = list(project.get("dependencies") or [])
        optional = project.get("optional-dependencies") or {}
        for extra in extras:
            if extra not in optional:
                raise BadInput(f"--extra {extra}: {pyproject} has no such optional group")
            deps += optional[extra]
        options = _tool_uv_sources(tomllib.loads(pyproject.read_text()), root)
        if (root / "uv.lock").is_file():
            # The lock is the resolution: its pins are installed as they are, and the worker
            # runs no resolver (``--locked``: rgrid.host.dependencies.is_locked).
            locked = options + "--locked\n" + _uv_export(root, extras)
            return ProjectDependencies(locked, "uv.lock")
        if deps or extras:
            return ProjectDependencies(options + "\n".join(deps) + "\n", "pyproject.toml")
    beside = script.parent / "requirements.txt"
    if beside.is_file():
        return ProjectDependencies(read_requirements_file(beside), "requirements.txt")
    return ProjectDependencies(None, None)


def _tool_uv_sources(document: dict, root: Path) -> str:
    """The project's ``[tool.uv]`` package sources (``index-url``, ``extra-index-url``,
    ``find-links``) as requirement option lines, where uv itself would look; a relative
    find-links folder is taken from the project root. The server checks them as it checks
    ``-r`` files' (allowed indexes, per-account caches for private sources)."""
    tool = (document.get("tool") or {}).get("uv") or {}
    lines = []
    if isinstance(tool.get("index-url"), str):
        lines.append(f"--index-url {tool['index-url']}")
    for url in tool.get("extra-index-url") or []:
        lines.append(f"--extra-index-url {url}")
    for link in tool.get("find-links") or []:
        local = "://" not in link and not Path(link).is_absolute()
        lines.append(f"--find-links {root / link if local else link}")
    return "".join(line + "\n" for line in lines)
