"""Requirements: reading them (a requirements file or PEP 723 inline script metadata) and
normalising them into the text whose hash is the dependency cache key.

Normalisation (docs/design.md): comments, blank lines and surrounding whitespace dropped, names
normalised as PEP 503 says, lines sorted. So the same set in another order or case is the same
key, and a changed pin is another. Option lines that change where packages come from
(``--index-url`` and friends) are part of the key; options that would reach outside what a
worker can see (editable installs, local paths, constraint files) are refused.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from rgrid.core.errors import BadInput
from rgrid.core.hashing import sha256_bytes

# PEP 723's reference regular expression for a metadata block.
_PEP723_BLOCK = re.compile(
    r"(?m)^# /// (?P<type>[a-zA-Z0-9-]+)$\s(?P<content>(^#(| .*)$\s)+)^# ///$"
)

#: Options kept in the key, with their short spellings.
_KEPT_OPTIONS = {
    "--index-url": "--index-url",
    "-i": "--index-url",
    "--extra-index-url": "--extra-index-url",
    "--find-links": "--find-links",
    "-f": "--find-links",
    "--pre": "--pre",
    # Not a pip option: uv takes it on its command line (rgrid/host/dependencies.py). It comes
    # from a PEP 723 block's ``[tool.uv] exclude-newer``.
    "--exclude-newer": "--exclude-newer",
    # Not a pip option either: the set is a whole resolution already (a ``uv.lock``'s
    # export, rgrid/client/sources.py), so its pins are installed as they are (uv's --no-deps) and
    # nothing is resolved. (--no-deps itself stays refused: in a hand-written file it would
    # leave out what the listed packages need.)
    "--locked": "--locked",
}

#: ``[tool.uv]`` settings of a PEP 723 block that RGrid honours, as the option each becomes.
#: Any other is refused: silently ignoring a setting would install something else than
#: ``uv run`` would.
_TOOL_UV_OPTIONS = {
    "exclude-newer": "--exclude-newer",
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
}
_REFUSED_OPTIONS = {
    "-c": "constraint files (-c) are not supported: pin the versions in the requirements",
    "--constraint": "constraint files (-c) are not supported: pin the versions in the requirements",
    "-e": "editable installs (-e) are not supported: the worker cannot see your folders",
    "--editable": "editable installs (-e) are not supported: the worker cannot see your folders",
}
MAX_INCLUDE_DEPTH = 10


def read_requirements_file(path: Path, _depth: int = 0, _seen: frozenset = frozenset()) -> str:
    """The file's lines with nested ``-r`` includes resolved (relative to the including file),
    so the worker receives one self-contained text."""
    if not path.is_file():
        raise BadInput(f"requirements file not found: {path}")
    resolved = path.resolve()
    if resolved in _seen or _depth > MAX_INCLUDE_DEPTH:
        raise BadInput(f"requirements include loop at {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"requirements file is not UTF-8 text: {path}") from exc
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        for flag in ("-r", "--requirement"):
            if line == flag or line.startswith(flag + " ") or line.startswith(flag + "="):
                include = line[len(flag) :].lstrip(" =")
                if not include:
                    raise BadInput(f"{path}: '{line}' names no file")
                lines.append(
                    read_requirements_file(path.parent / include, _depth + 1, _seen | {resolved})
                )
                break
        else:
            try:
                normalise(raw)
            except BadInput as exc:
                raise BadInput(
                    exc.message.replace("requirements line 1:", f"{path}:{number}:", 1)
                ) from None
            lines.append(raw)
    return "\n".join(lines) + "\n"


def inline_metadata(script: str) -> dict | None:
    """PEP 723 ``# /// script`` metadata, or None when the script has none."""
    blocks = [m for m in _PEP723_BLOCK.finditer(script) if m.group("type") == "script"]
    if not blocks:
        return None
    if len(blocks) > 1:
        raise BadInput("the script has more than one '# /// script' metadata block")
    content = "".join(
        line[2:] if line.startswith("# ") else line[1:]
        for line in blocks[0].group("content").splitlines(keepends=True)
    )
    try:
        return tomllib.loads(content)
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"the script's '# /// script' metadata is not valid TOML: {exc}") from exc


def inline_requirements(script: str, python_version: str) -> str | None:
    """The ``dependencies`` of the script's PEP 723 block as requirement lines, after checking
    its ``requires-python`` against the runtime's Python."""
    metadata = inline_metadata(script)
    if metadata is None:
        return None
    requires_python = metadata.get("requires-python")
    if requires_python is not None:
        from packaging.specifiers import SpecifierSet  # see _normalise_requirement

        try:
            spec = SpecifierSet(str(requires_python))
        except ValueError as exc:
            raise BadInput(f"bad requires-python in the script: {requires_python!r}") from exc
        if not spec.contains(python_version + ".0", prereleases=True):
            raise BadInput(
                f"the script requires Python {requires_python}; the runtime has {python_version}"
            )
    deps = metadata.get("dependencies", [])
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise BadInput("the script's 'dependencies' must be a list of strings")
    for dep in deps:
        if dep.strip().startswith("-") or "\n" in dep or "\r" in dep:
            raise BadInput(f"the script's dependency {dep!r} is not a requirement specifier")
    lines = _tool_uv_options(metadata) + deps
    return "\n".join(lines) + ("\n" if lines else "")


def _tool_uv_options(metadata: dict) -> list[str]:
    """The block's ``[tool.uv]`` settings as option lines (part of the cache key)."""
    tool = metadata.get("tool", {})
    settings = tool.get("uv", {}) if isinstance(tool, dict) else {}
    if not isinstance(settings, dict):
        raise BadInput("the script's [tool.uv] must be a table")
    lines = []
    for key, value in settings.items():
        if key not in _TOOL_UV_OPTIONS:
            supported = ", ".join(sorted(_TOOL_UV_OPTIONS))
            raise BadInput(
                f"the script's [tool.uv] setting {key!r} is not supported (supported: {supported})"
            )
        values = value if isinstance(value, list) else [value]
        for item in values:
            if not isinstance(item, str) or not item.strip() or any(c.isspace() for c in item):
                raise BadInput(f"the script's [tool.uv] {key} must be a string without spaces")
            lines.append(f"{_TOOL_UV_OPTIONS[key]} {item}")
    return lines


def _is_web_url(value: str) -> bool:
    return value.lower().startswith(("http://", "https://"))


def check_local_paths(normalised: str, allowed: bool) -> None:
    """``--find-links`` to a folder reads the worker host's disk: only where the operator
    allows it (RGRID_ALLOW_LOCAL_FIND_LINKS, e.g. for a shared wheel folder on every host)."""
    if allowed:
        return
    for line in normalised.splitlines():
        if line.startswith("--find-links ") and not _is_web_url(line.split(" ", 1)[1]):
            raise BadInput("--find-links to a local folder is not allowed here: use an http(s) URL")


def _strip_comment(line: str) -> str:
    # A '#' starts a comment at the line's start or after whitespace (pip's rule), so URL
    # fragments such as 'pkg @ https://x/y.whl#sha256=...' survive.
    if line.startswith("#"):
        return ""
    return re.split(r"\s+#", line, maxsplit=1)[0].strip()


def _normalise_option(line: str, number: int) -> str:
    flag, _, value = line.replace("=", " ", 1).partition(" ")
    if flag in _REFUSED_OPTIONS:
        raise BadInput(f"requirements line {number}: {_REFUSED_OPTIONS[flag]}")
    if flag not in _KEPT_OPTIONS:
        raise BadInput(f"requirements line {number}: unsupported option '{flag}'")
    canonical = _KEPT_OPTIONS[flag]
    value = value.strip()
    if canonical in ("--pre", "--locked"):
        return canonical
    if not value:
        raise BadInput(f"requirements line {number}: '{flag}' needs a value")
    if canonical in ("--index-url", "--extra-index-url") and not _is_web_url(value):
        raise BadInput(f"requirements line {number}: '{flag}' must be an http(s) URL")
    return f"{canonical} {value}"


def _normalise_requirement(line: str, number: int) -> str:
    # Imported here: the CLI reads requirements files with this module, and packaging's
    # import (~12 ms) would be in every `rgrid run -r`, which never normalises.
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    try:
        req = Requirement(line)
    except InvalidRequirement as exc:
        raise BadInput(f"requirements line {number}: '{line}' is not a valid requirement") from exc
    # packaging takes what uv refuses ('numpy===', 'numpy>=1,'): refuse it here, where the
    # message can name the user's own file and line.
    if any(not spec.version.strip() for spec in req.specifier) or re.search(r",\s*(;|$)", line):
        raise BadInput(f"requirements line {number}: '{line}' has an operator without a version")
    if req.url and not _is_web_url(req.url):
        raise BadInput(
            f"requirements line {number}: only http(s) URLs can be installed, not {req.url!r}"
        )
    text = canonicalize_name(req.name)
    if req.extras:
        text += "[" + ",".join(sorted(canonicalize_name(e) for e in req.extras)) + "]"
    if req.url:
        text += f" @ {req.url}"
    elif req.specifier:
        text += ",".join(sorted(str(s) for s in req.specifier))
    if req.marker:
        text += f" ; {req.marker}"
    return text


def normalise(text: str) -> str:
    """The canonical form: options first, then requirements, each group sorted, one per line."""
    options, requirements = set(), set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw.strip())
        if not line:
            continue
        if line.startswith(("-r", "--requirement")):
            raise BadInput(f"requirements line {number}: nested '-r' must be resolved first")
        if line.startswith("-"):
            options.add(_normalise_option(line, number))
        else:
            requirements.add(_normalise_requirement(line, number))
    lines = sorted(options) + sorted(requirements)
    return "".join(line + "\n" for line in lines)


def dependency_hash(normalised: str) -> str:
    """The dependency cache's key part; the empty set hashes like empty bytes."""
    return sha256_bytes(normalised.encode())
