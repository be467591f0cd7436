"""A run's submission as one object: the script and every option it runs with, built once
(by the CLI, or by the API from a checked request body) and handed unchanged through the
client, the agent and the service to ``create_execution`` and a batch's template.

Why a standard-library dataclass and not a pydantic model: the CLI builds it on every
`rgrid run`, and importing pydantic costs about 0.24 s of a CLI start (measured here), most of
a warm run's budget. The shape of a body from outside is checked where it arrives, by the
API's pydantic models (rgrid/api/schemas.py, which also publish it as OpenAPI); what depends
on the operator's settings (sizes, limits, runtimes) is checked once, by the service
(``check_submission``), for the API and the embedded default alike.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rgrid.core.config import DEFAULT_RUNTIME

#: The fields a single submission has and a batch has not (a batch's executions upload
#: nothing themselves, carry no inline files and keep no secrets).
SUBMISSION_ONLY = ("files_uploaded", "bytes_uploaded", "inline", "env")


@dataclass(frozen=True)
class RunSpec:
    """What a run is: the script, where it sits in its project, and how it runs."""

    script: str
    script_name: str = "script.py"
    runtime: str = DEFAULT_RUNTIME
    timeout_s: int | None = None
    args: list[str] = field(default_factory=list)
    requirements: str | None = None
    refresh_deps: bool = False
    memory: str | int | None = None
    cpus: float | None = None
    #: ``{path, sha256, size}`` of each input (a batch's: the shared ones).
    inputs: list[dict] = field(default_factory=list)
    #: The local modules shipped with the script, at their paths relative to its project.
    sources: list[dict] | None = None
    #: Run as ``python -m MODULE``; the script is that module's file.
    module: str | None = None
    #: Where the client found the dependencies, for the log and `status`.
    dependency_source: str | None = None
    #: Answer from a previous succeeded run with the same action key (None: the server's
    #: default, RGRID_REUSE_DEFAULT); ``refresh``: run anyway and replace that entry.
    reuse: bool | None = None
    refresh: bool = False
    # A single submission's own:
    files_uploaded: int = 0
    bytes_uploaded: int = 0
    #: ``{sha256, data}`` (base64): small files carried in the submission's body.
    inline: list[dict] | None = None
    #: Secrets: never stored, logged or shown (hence kept out of the repr).
    env: dict[str, str] | None = field(default=None, repr=False)

    def fields(self) -> dict[str, Any]:
        """Every field, by name (not deep-copied, as ``dataclasses.asdict`` would)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def submit_body(self, stdin: bool = False) -> dict[str, Any]:
        """The JSON body of ``POST /v1/executions``: the script and its core options always,
        the rest when given."""
        body = {
            "script": self.script,
            "script_name": self.script_name,
            "runtime": self.runtime,
            "timeout_s": self.timeout_s,
            "args": self.args,
            "stdin": stdin,
        }
        rest = {**self.fields(), "refresh": self.refresh or None}
        body.update({k: v for k, v in rest.items() if k not in body and v is not None})
        return body

    def batch_body(self) -> dict[str, Any]:
        """What ``POST /v1/batches`` takes of it (``parallel`` and ``size`` are the batch's):
        what is given, without a single submission's own fields."""
        given = {
            **self.fields(),
            "refresh_deps": self.refresh_deps or None,
            "refresh": self.refresh or None,
        }
        return {
            key: value
            for key, value in given.items()
            if value is not None and key not in SUBMISSION_ONLY
        }

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> RunSpec:
        """From a body as ``submit_body`` wrote it (the agent's socket carries it so); what
        is not one of its fields (``stdin``) is left out."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in body.items() if key in names})
