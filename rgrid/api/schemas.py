"""The API's contract: every request body, query string and path parameter as a pydantic
model, checked before any database or Redis call, and the OpenAPI document built from the
very same models (``/v1/openapi.json``), so the published contract cannot drift from the
checks.

Why pydantic, with a few lines of glue rather than flask-smorest or spectree: it was already
installed (Celery's and Flower's dependencies bring it), its JSON parser refuses what
PostgreSQL would choke on later (lone surrogates) while parsing, its errors name the field,
and its JSON Schema output is the OpenAPI 3.1 schema dialect as it stands. The glue here is
one decorator and one loop over Flask's URL map.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Annotated, Any

from flask import Flask, request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from rgrid.core.config import DEFAULT_RUNTIME
from rgrid.core.errors import BadInput
from rgrid.core.spec import RunSpec
from rgrid.store.channels import ENV_NAME, MAX_ENV_BYTES, MAX_ENV_VARS

#: No control characters (NUL included): PostgreSQL refuses NUL, and a tar header or a
#: terminal would misread the others.
_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
Digest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
ScriptName = Annotated[
    str,
    StringConstraints(
        min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f/][^\x00-\x1f\x7f]*$"
    ),
]
InputPath = Annotated[
    str, StringConstraints(min_length=1, max_length=1024, pattern=r"^[^\x00-\x1f\x7f]+$")
]
Argument = Annotated[str, StringConstraints(max_length=128 * 1024, pattern=r"^[^\x00]*$")]
EnvName = Annotated[str, StringConstraints(max_length=128, pattern=f"^{ENV_NAME}$")]
EnvValue = Annotated[str, StringConstraints(max_length=MAX_ENV_BYTES, pattern=r"^[^\x00]*$")]
Count = Annotated[int, Field(ge=0, le=2**53)]
#: A count stored in a 32-bit column.
SmallCount = Annotated[int, Field(ge=0, le=2**31 - 1)]

#: Path parameters, by name, wherever a route takes them.
PATH_PARAMETERS = {
    "execution_id": r"^(last|[0-9a-f]{4,16})$",
    "upload_id": r"^[0-9a-f]{32}$",
    "batch_id": r"^(last|[0-9a-f]{4,10})$",
}


class _Strict(BaseModel):
    """Unknown fields are refused (a misspelt option must not pass silently), and no type is
    coerced: ``true`` is not an integer, ``"5"`` is not a list."""

    model_config = ConfigDict(extra="forbid", strict=True)


class InputEntry(_Strict):
    path: InputPath
    sha256: Digest
    size: Count


class InlineFile(_Strict):
    """A small file sent in the submission's own body in place of an upload: its digest and
    its bytes, base64 (standard alphabet, padded)."""

    sha256: Digest
    data: Annotated[
        str, StringConstraints(max_length=8 * 1024 * 1024, pattern=r"^[A-Za-z0-9+/]*={0,2}$")
    ]


class _ScriptRequest(_Strict):
    """The options a single execution and a batch share: the script and how it runs."""

    script: str = Field(max_length=1024 * 1024)
    script_name: ScriptName = "script.py"
    runtime: Annotated[str, StringConstraints(max_length=40, pattern=r"^[a-z0-9.:_-]+$")] = (
        DEFAULT_RUNTIME
    )
    timeout_s: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    args: list[Argument] = Field(default_factory=list, max_length=10_000)
    requirements: Annotated[str, Field(max_length=1024 * 1024)] | None = None
    refresh_deps: bool = False
    memory: (
        Annotated[str, StringConstraints(max_length=20, pattern=_PRINTABLE)]
        | Annotated[int, Field(ge=0, le=2**50)]
        | None
    ) = None
    cpus: Annotated[float, Field(gt=0, le=1024)] | None = None
    inputs: list[InputEntry]
    #: The local modules shipped with the script, at their paths relative to its project.
    sources: list[InputEntry] | None = Field(default=None, max_length=100_000)
    #: Run as ``python -m MODULE``; the script is that module's file.
    module: Annotated[str, StringConstraints(max_length=255)] | None = None
    #: Where the client found the dependencies, for the log and `status`.
    dependency_source: (
        Annotated[str, StringConstraints(max_length=300, pattern=_PRINTABLE)] | None
    ) = None

    def spec(self) -> RunSpec:
        """The run this checked body describes, as the service takes it (``create_execution``,
        ``create_batch``): every field the spec has, nested entries as plain dicts; what is
        the request's alone (``stdin``, a batch's ``parallel`` and ``size``) is left out."""
        return RunSpec.from_body(self.model_dump())


class SubmitRequest(_ScriptRequest):
    inputs: list[InputEntry] = Field(default_factory=list, max_length=100_000)
    #: The local modules shipped with the script, at their paths relative to its project.
    files_uploaded: SmallCount = 0
    bytes_uploaded: Count = 0
    stdin: bool = False
    #: Files of ``inputs`` or ``sources`` the account lacked, small enough to come inline
    #: (at most RGRID_INLINE_UPLOAD_BYTES in all, as ``POST /blobs/missing`` says): checked
    #: against their digests and stored as uploads are, before the submission is.
    inline: list[InlineFile] | None = Field(default=None, max_length=10_000)
    env: dict[EnvName, EnvValue] | None = Field(default=None, max_length=MAX_ENV_VARS)
    #: Answer from a previous succeeded run with the same action key (None: the server's
    #: default, RGRID_REUSE_DEFAULT); ``refresh``: run anyway and replace that entry.
    reuse: bool | None = None
    refresh: bool = False


class BatchRequest(_ScriptRequest):
    """What every execution of a batch shares; its inputs are added in pages afterwards."""

    #: Shared inputs: placed beside every execution's own input.
    inputs: list[InputEntry] = Field(default_factory=list, max_length=10_000)
    #: At most this many of its executions queued or running at once; none: no bound.
    parallel: Annotated[int, Field(ge=1, le=100_000)] | None = None
    #: How many inputs will be added: a batch over the limit is refused before it exists.
    size: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    #: Answer each input from a previous succeeded run with the same action key (None: the
    #: server's default, RGRID_REUSE_DEFAULT); ``refresh``: run every one anyway.
    reuse: bool | None = None
    refresh: bool = False


class BatchInputsRequest(_Strict):
    """One page of a batch's inputs: one execution each."""

    inputs: list[InputEntry] = Field(min_length=1, max_length=1000)


class MissingRequest(_Strict):
    #: One query answers them all; more than this is refused rather than queued.
    digests: list[Digest] = Field(max_length=10_000)


class UploadRequest(_Strict):
    sha256: Digest
    size: Count


class UploadPart(_Strict):
    part_number: Annotated[int, Field(ge=1, le=10_000)]
    etag: Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=_PRINTABLE)]


class CompleteUploadRequest(_Strict):
    parts: list[UploadPart] = Field(default_factory=list, max_length=10_000)


class _Query(BaseModel):
    """Query strings are text: numbers are parsed from them, nothing else is coerced."""

    model_config = ConfigDict(extra="forbid")


class LogsQuery(_Query):
    offset: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    wait: Annotated[float, Field(ge=0, le=10)] = 0.0


class ListQuery(_Query):
    limit: Annotated[int, Field(ge=1, le=500)] = 20


class ExecutionListQuery(ListQuery):
    #: 1: leave out the executions of batches (each batch is listed at /v1/batches).
    standalone: Annotated[int, Field(ge=0, le=1)] = 0


class BatchExecutionsQuery(_Query):
    after: Annotated[str, StringConstraints(max_length=16, pattern=r"^[0-9a-f]*$")] = ""
    finished_since: (
        Annotated[str, StringConstraints(max_length=40, pattern=r"^[0-9T:.+\-]+$")] | None
    ) = None
    limit: Annotated[int, Field(ge=1, le=1000)] = 500


class CacheEntriesQuery(_Query):
    limit: Annotated[int, Field(ge=1, le=1000)] = 100


class CachePurgeRequest(_Strict):
    """Entries unused for at least ``older_than_s`` seconds; ``all``: every entry."""

    older_than_s: Annotated[int, Field(ge=0, le=100 * 365 * 86400)] | None = None
    all: bool = False


class ExecutionQuery(_Query):
    #: 1: also ask the object store whether the execution's log and outputs are still there.
    check_store: Annotated[int, Field(ge=0, le=1)] = 0


class StdinQuery(_Query):
    eof: Annotated[int, Field(ge=0, le=1)] = 0


def _message(exc: ValidationError) -> str:
    """One line naming the first bad field."""
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"]) or "body"
    return f"{where}: {error['msg']}"


def validated(
    body: type[BaseModel] | None = None, query: type[BaseModel] | None = None
) -> Callable:
    """Parse and check the request before the view runs; the view receives ``body`` and/or
    ``query`` as models. A bad request is a 400 naming the field. The models are also what
    :func:`openapi` publishes for the route."""

    def decorate(view: Callable) -> Callable:
        @functools.wraps(view)
        def wrapper(**path: str) -> Any:
            for name, value in path.items():
                _check_path(name, value)
            kwargs: dict[str, Any] = dict(path)
            try:
                if body is not None:
                    kwargs["body"] = body.model_validate_json(request.get_data() or b"{}")
                if query is not None:
                    kwargs["query"] = query.model_validate(request.args.to_dict())
            except ValidationError as exc:
                raise BadInput(_message(exc)) from None
            return view(**kwargs)

        wrapper.rgrid_body = body  # type: ignore[attr-defined]
        wrapper.rgrid_query = query  # type: ignore[attr-defined]
        return wrapper

    return decorate


def _check_path(name: str, value: str) -> None:
    pattern = PATH_PARAMETERS.get(name)
    if pattern and not re.fullmatch(pattern, value):
        raise BadInput(f"{name}: not a valid {name.replace('_', ' ')}")


ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}},
    "required": ["error"],
}


def openapi(app: Flask) -> dict:
    """The OpenAPI 3.1 document of every ``/v1`` route, from Flask's URL map and the models
    its views are validated with."""
    paths: dict[str, dict] = {}
    schemas: dict[str, dict] = {"Error": ERROR}
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/v1/") or rule.endpoint.endswith("openapi"):
            continue
        view = app.view_functions[rule.endpoint]
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            paths.setdefault(path, {})[method.lower()] = _operation(rule, view, method, schemas)
    return {
        "openapi": "3.1.0",
        "info": {"title": "RGrid API", "version": "1"},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _operation(rule: Any, view: Callable, method: str, schemas: dict[str, dict]) -> dict:
    """One route's operation: its parameters, the answers it may give and its body's model
    (added to ``schemas``)."""
    operation: dict[str, Any] = {
        "operationId": rule.endpoint.replace(".", "_"),
        "summary": (view.__doc__ or rule.endpoint).strip().splitlines()[0],
        "parameters": [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": PATH_PARAMETERS[name]},
            }
            for name in sorted(rule.arguments)
        ],
        "responses": dict(RESPONSES),
    }
    query = getattr(view, "rgrid_query", None)
    if query is not None:
        properties = query.model_json_schema()["properties"]
        for name, schema in properties.items():
            operation["parameters"].append(
                {"name": name, "in": "query", "required": False, "schema": schema}
            )
    body = getattr(view, "rgrid_body", None)
    if body is not None:
        schema = body.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[body.__name__] = schema
        operation["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{body.__name__}"}}
            },
        }
    elif method == "POST" and rule.endpoint.endswith("stdin"):
        operation["requestBody"] = {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string"}}},
        }
    return operation


def _error_response(description: str) -> dict:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


#: The answers every operation may give.
RESPONSES = {
    "200": {"description": "OK"},
    "201": {"description": "Created"},
    "400": _error_response("Invalid request: the message names the field"),
    "401": _error_response("Missing, invalid or revoked API key"),
    "404": _error_response("No such execution or upload in this account"),
    "413": _error_response("Request body too large"),
    "429": _error_response("An account's cap on open uploads or staged bytes is reached for now"),
    "503": _error_response("A service behind the API is unavailable"),
}
