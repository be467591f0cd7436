"""The API's published contract: each hostile input a fuzzer found answered with a 400 (or
413) naming the field, never a 500; the OpenAPI document; the size and count limits."""

import json

import pytest

from rgrid.api import MAX_REQUEST_BYTES, create_app
from rgrid.core.db import session_scope
from rgrid.service import accounts

GOOD = {"script": "print(1)\n", "script_name": "ok.py"}
DIGEST = "a" * 64


@pytest.fixture(scope="module")
def client(server_settings, ctx):
    with session_scope(ctx.session_factory) as session:
        account = accounts.get_or_create_account(session, "contract")
        _row, secret = accounts.issue_key(session, account)
    test_client = create_app(server_settings).test_client()
    test_client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {secret}"
    return test_client


def _post(client, path: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    response = client.post(path, data=data, content_type="application/json")
    return response.status_code, response.get_json(silent=True) or {}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**GOOD, "args": 5}, "args"),
        ({**GOOD, "args": "abc"}, "args"),
        ({**GOOD, "args": {"a": 1}}, "args"),
        ({**GOOD, "script_name": "a\x00b.py"}, "script_name"),
        ({**GOOD, "script_name": "x" * 300}, "script_name"),
        ({**GOOD, "timeout_s": 2**31}, "timeout_s"),
        ({**GOOD, "timeout_s": 2**63}, "timeout_s"),
        ({**GOOD, "timeout_s": True}, "timeout_s"),
        ({**GOOD, "files_uploaded": True}, "files_uploaded"),
        ({**GOOD, "bytes_uploaded": 2**63}, "bytes_uploaded"),
        ({**GOOD, "refresh_deps": "yes"}, "refresh_deps"),
        ({**GOOD, "inputs": [{"path": "a\x00b", "sha256": DIGEST, "size": 1}]}, "inputs.0.path"),
        ({**GOOD, "env": {"1BAD": "x"}}, "env"),
        ({**GOOD, "memory": True}, "memory"),
        ({**GOOD, "unknown_option": 1}, "unknown_option"),
        ({**GOOD, "inline": [{"sha256": DIGEST, "data": "not base64!"}]}, "inline.0.data"),
        ({**GOOD, "inline": [{"sha256": "x", "data": ""}]}, "inline.0.sha256"),
        ({**GOOD, "inline": {"a": 1}}, "inline"),
        ({"script_name": "ok.py"}, "script"),
    ],
)
def test_bad_submissions_are_400_naming_the_field(client, body, field):
    status, answer = _post(client, "/v1/executions", body)
    assert status == 400, answer
    assert answer["error"].startswith(field), answer["error"]


def test_a_lone_surrogate_in_the_script_is_400(client):
    raw = '{"script": "print(\\"\\ud800\\")", "script_name": "s.py"}'
    status, answer = _post(client, "/v1/executions", raw)
    assert status == 400 and answer["error"].startswith("body: Invalid JSON")


def test_nul_in_an_id_in_the_url_and_huge_offsets_are_400(client):
    assert client.get("/v1/executions/abc%00def").status_code == 400
    assert client.get("/v1/executions/" + "f" * 40).status_code == 400
    for offset in ("9223372036854775808", "-1", "x"):
        response = client.get(f"/v1/executions/last/logs?offset={offset}")
        assert response.status_code == 400 and "offset" in response.get_json()["error"]
    assert client.get("/v1/executions?limit=0").status_code == 400
    assert client.post("/v1/uploads/zz%00/complete", json={"parts": []}).status_code == 400


def test_malformed_multipart_parts_are_400(client):
    for parts in ([{"part_number": "1"}], ["x"], [{"part_number": 1, "etag": 5}], "parts"):
        status, answer = _post(client, f"/v1/uploads/{'0' * 32}/complete", {"parts": parts})
        assert status == 400 and answer["error"].startswith("parts"), answer


def test_the_request_size_and_the_digest_list_are_bounded(client):
    big = json.dumps({**GOOD, "script": "x" * MAX_REQUEST_BYTES})
    assert _post(client, "/v1/executions", big)[0] == 413
    status, answer = _post(client, "/v1/blobs/missing", {"digests": [DIGEST] * 10_001})
    assert status == 400 and answer["error"].startswith("digests")
    many = [f"{i:064x}" for i in range(10_000)]
    status, answer = _post(client, "/v1/blobs/missing", {"digests": many})
    assert status == 200 and answer["missing"] == many


def test_pep723_dependencies_are_requirement_specifiers_only(client):
    for dep in ("--index-url http://x/simple", "six\\n--index-url http://x/simple"):
        script = f'# /// script\n# dependencies = ["{dep}"]\n# ///\n'
        status, answer = _post(client, "/v1/executions", {"script": script})
        assert status == 400 and "not a requirement specifier" in answer["error"], answer


def test_the_openapi_document_describes_every_route_from_the_models(client):
    spec = client.get("/v1/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    submit = spec["paths"]["/v1/executions"]["post"]
    schema = spec["components"]["schemas"]["SubmitRequest"]
    assert submit["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/SubmitRequest"
    )
    assert schema["additionalProperties"] is False
    assert schema["properties"]["script_name"]["maxLength"] == 255
    logs = spec["paths"]["/v1/executions/{execution_id}/logs"]["get"]
    assert {p["name"] for p in logs["parameters"]} == {"execution_id", "offset", "wait"}
    assert "/v1/uploads/{upload_id}/complete" in spec["paths"]


def test_metrics_answer_only_the_operator(server_settings):
    from dataclasses import replace

    open_app = create_app(server_settings).test_client()
    assert open_app.get("/metrics", environ_base={"REMOTE_ADDR": "10.0.0.5"}).status_code == 404
    assert open_app.get("/metrics").status_code == 200  # the test client is loopback
    guarded = create_app(replace(server_settings, metrics_token="m-token")).test_client()
    assert guarded.get("/metrics").status_code == 401
    ok = guarded.get("/metrics", headers={"Authorization": "Bearer m-token"})
    assert ok.status_code == 200 and b"rgrid_executions_submitted_total" in ok.data


def test_a_module_sent_inline_is_stored_and_a_repeat_finds_it(client):
    """The missing-digests answer says how many bytes may come inline; a submission carrying
    the file runs, and the file is then stored like an upload."""
    import base64
    import hashlib
    import secrets

    data = f"VALUE = {secrets.token_hex(8)!r}\n".encode()
    digest = hashlib.sha256(data).hexdigest()
    status, answer = _post(client, "/v1/blobs/missing", {"digests": [digest]})
    assert status == 200 and answer["missing"] == [digest]
    assert 0 < answer["inline_bytes"] <= MAX_REQUEST_BYTES // 4
    source = {"path": "mod.py", "sha256": digest, "size": len(data)}
    body = {
        "script": "import mod\n",
        "script_name": "main.py",
        "sources": [source],
        "inline": [{"sha256": digest, "data": base64.b64encode(data).decode()}],
    }
    status, answer = _post(client, "/v1/executions", body)
    assert status == 201, answer
    assert _post(client, "/v1/blobs/missing", {"digests": [digest]})[1]["missing"] == []
    status, answer = _post(client, "/v1/executions", {**body, "inline": None})
    assert status == 201, answer
