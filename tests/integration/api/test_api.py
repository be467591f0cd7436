"""The HTTP API against the real database, Redis and object store."""

import pytest

from rgrid.api import create_app
from rgrid.core.db import session_scope
from rgrid.service import accounts


@pytest.fixture(scope="module")
def app(server_settings):
    return create_app(server_settings)


@pytest.fixture
def issue_key(ctx):
    def _issue(name: str) -> tuple[int, int, str]:
        with session_scope(ctx.session_factory) as session:
            account = accounts.get_or_create_account(session, name)
            row, secret = accounts.issue_key(session, account)
            return account.id, row.id, secret

    return _issue


def _auth(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


def test_requests_without_a_valid_key_are_refused(app, ctx, issue_key):
    client = app.test_client()
    response = client.get("/v1/executions")
    assert response.status_code == 401
    assert response.json == {"error": "missing API key: set RGRID_API_KEY"}
    response = client.get("/v1/executions", headers=_auth("rgk_not-a-key"))
    assert response.status_code == 401
    assert response.json["error"] == "invalid or revoked API key"

    _, key_id, secret = issue_key("revoked-user")
    assert client.get("/v1/executions", headers=_auth(secret)).status_code == 200
    with session_scope(ctx.session_factory) as session:
        accounts.revoke_key(session, key_id)
    response = client.get("/v1/executions", headers=_auth(secret))
    assert response.status_code == 401 and response.json["error"] == "invalid or revoked API key"


def test_keys_are_stored_hashed(ctx, issue_key):
    from rgrid.core.models import ApiKey

    _, key_id, secret = issue_key("hashed-user")
    with session_scope(ctx.session_factory) as session:
        row = session.get(ApiKey, key_id)
        assert secret not in (row.key_hash, row.prefix) and len(row.key_hash) == 64


def test_a_key_records_its_use_to_the_minute_not_on_every_request(app, ctx, issue_key):
    """Following a run is many requests: the key's ``last_used_at`` is written at its first
    use and again once it is a minute old, not by each of them."""
    from datetime import timedelta

    from rgrid.core.models import ApiKey

    _, key_id, secret = issue_key("key-use-user")
    client = app.test_client()

    def last_used():
        with session_scope(ctx.session_factory) as session:
            return session.get(ApiKey, key_id).last_used_at

    assert last_used() is None
    assert client.get("/v1/executions", headers=_auth(secret)).status_code == 200
    first = last_used()
    assert first is not None
    assert client.get("/v1/executions", headers=_auth(secret)).status_code == 200
    assert last_used() == first
    with session_scope(ctx.session_factory) as session:
        stale = first - timedelta(seconds=accounts.KEY_USE_RESOLUTION_S)
        session.get(ApiKey, key_id).last_used_at = stale
    assert client.get("/v1/executions", headers=_auth(secret)).status_code == 200
    assert last_used() > first


def test_create_validates_and_scopes_to_the_account(app, issue_key):
    client = app.test_client()
    _, _, alice = issue_key("alice")
    _, _, bob = issue_key("bob")

    response = client.post(
        "/v1/executions", json={"script": "pass\n", "runtime": "python:2.7"}, headers=_auth(alice)
    )
    assert response.status_code == 400
    assert response.json["error"] == "unknown runtime 'python:2.7' (known: python:3.11)"
    response = client.post("/v1/executions", data="not json", headers=_auth(alice))
    assert response.status_code == 400
    response = client.post(
        "/v1/executions", json={"script": "pass\n", "timeout_s": "soon"}, headers=_auth(alice)
    )
    assert response.status_code == 400

    response = client.post(
        "/v1/executions", json={"script": "print(1)\n", "script_name": "a.py"}, headers=_auth(alice)
    )
    assert response.status_code == 201
    execution = response.json
    assert execution["status"] == "queued" and execution["script_name"] == "a.py"
    execution_id = execution["execution_id"]

    assert client.get(f"/v1/executions/{execution_id}", headers=_auth(alice)).status_code == 200
    # Another account cannot tell the execution exists: 404, not 403.
    for path in ("", "/logs", "/outputs"):
        response = client.get(f"/v1/executions/{execution_id}{path}", headers=_auth(bob))
        assert response.status_code == 404, path
    listed = client.get("/v1/executions", headers=_auth(bob)).json["executions"]
    assert execution_id not in [e["execution_id"] for e in listed]


def test_health_and_metrics_need_no_key(app):
    client = app.test_client()
    assert client.get("/healthz").json == {"status": "ok"}
    assert b"rgrid_executions_submitted_total" in client.get("/metrics").data


#: Run in a fresh interpreter: the API's own process, as gunicorn builds it.
_SERVE_ONE_SUBMISSION = """
import json, sys
from rgrid.service import accounts
from rgrid.api import create_app
from rgrid.core.db import session_scope

app = create_app()
with session_scope(app.extensions["rgrid"].session_factory) as session:
    _, secret = accounts.issue_key(session, accounts.get_or_create_account(session, sys.argv[1]))
client = app.test_client()
headers = {"Authorization": f"Bearer {secret}"}
created = client.post("/v1/executions", json={"script": "print(1)\\n"}, headers=headers)
assert created.status_code == 201, created.json
client.get(f"/v1/executions/{created.json['execution_id']}/logs", headers=headers)
# A cancel is written through the service: the API loads no pipeline step for it either.
other = client.post("/v1/executions", json={"script": "print(2)\\n"}, headers=headers)
stopped = client.post(f"/v1/executions/{other.json['execution_id']}/cancel", headers=headers)
assert stopped.status_code == 200 and stopped.json["status"] == "cancelled", stopped.json
steps = ("docker", "rgrid.pipeline.context", "rgrid.pipeline.hash", "rgrid.pipeline.lookup",
         "rgrid.pipeline.build", "rgrid.pipeline.run", "rgrid.pipeline.store",
         "rgrid.pipeline.chain", "workers", "workers.tasks")
loaded = [m for m in steps if m in sys.modules]
print(json.dumps({"execution_id": created.json["execution_id"], "loaded": loaded}))
"""


def test_the_api_queues_by_task_name_without_loading_the_worker_side(server_settings, redis_url):
    """Submitting, reading a log and cancelling load neither Docker nor a pipeline step."""
    import base64
    import json
    import os
    import secrets
    import subprocess
    import sys

    import redis

    from rgrid.core import queueing

    env = {
        **os.environ,
        "RGRID_DATABASE_URL": server_settings.database_url,
        "RGRID_S3_BUCKET": server_settings.s3_bucket,
    }
    account = f"imports-{secrets.token_hex(4)}"
    result = subprocess.run(
        [sys.executable, "-c", _SERVE_ONE_SUBMISSION, account],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    served = json.loads(result.stdout)
    assert served["loaded"] == []

    # What it queued: the chain's first step by name, the others behind it in order.
    queued = [
        json.loads(m)
        for m in redis.Redis.from_url(redis_url).lrange(os.environ["RGRID_QUEUE"], 0, -1)
    ]
    (ours,) = [m for m in queued if served["execution_id"] in m["headers"]["argsrepr"]]
    assert ours["headers"]["task"] == queueing.HASH
    _args, _kwargs, embed = json.loads(base64.b64decode(ours["body"]))
    assert [step["task"] for step in reversed(embed["chain"])] == list(queueing.PIPELINE[1:])


def test_a_failing_service_is_named_without_its_internal_detail(app, issue_key, monkeypatch):
    """Issue 10: the cause's text (addresses, library messages) stays in the server's log."""
    import secrets

    from rgrid.core.errors import ServiceUnavailable
    from rgrid.store import blobs

    def store_down(*args, **kwargs):
        raise ServiceUnavailable(
            "object store unreachable: Could not connect to the endpoint URL: "
            "http://10.0.0.5:9000/rgrid/blobs/1/x"
        )

    monkeypatch.setattr(blobs, "missing_digests", store_down)
    _, _, secret = issue_key(f"svc-{secrets.token_hex(4)}")
    response = app.test_client().post(
        "/v1/blobs/missing", json={"digests": ["0" * 64]}, headers=_auth(secret)
    )
    assert response.status_code == 503
    assert response.json == {"error": "object store unreachable"}
