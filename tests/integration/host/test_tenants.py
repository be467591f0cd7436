"""Tenants cannot hurt each other (issue 10): private packages stay with the account that has
the password, the worker host fetches only allowed package indexes, and what cannot be reached
says so in the same words whatever listens there. Real PostgreSQL, Redis, S3, Docker, uv."""

from __future__ import annotations

import secrets
from dataclasses import replace

import pytest

from rgrid.core.db import session_scope
from rgrid.core.errors import BadInput
from rgrid.pipeline.chain import run_all
from rgrid.service import executions as svc
from rgrid.service.accounts import create_account
from scripts.devenv import free_port
from tests.conftest import stored_log
from tests.index_server import private_index
from tests.wheels import make_wheel


def _second_account(ctx) -> int:
    with session_scope(ctx.session_factory) as session:
        return create_account(session, f"tenant-b-{secrets.token_hex(4)}").id


def _files_named(root, dist: str) -> list[str]:
    module = dist.replace("-", "_")
    return [str(p) for p in root.rglob("*") if module in p.name] if root.is_dir() else []


def test_a_private_package_never_reaches_an_account_without_the_password(
    ctx, run_script, account, tmp_path
):
    dist = f"privpkg-{secrets.token_hex(4)}"
    module = dist.replace("-", "_")
    make_wheel(tmp_path, dist, "1.0")
    script = f"import {module}\nprint({module}.VERSION)\n"
    with private_index(tmp_path) as index:
        mine = run_script(script, requirements=f"--index-url {index.url()}\n{dist}\n")
        assert mine["status"] == "succeeded", mine["error"]
        assert mine["resolved_dependencies"] == [f"{dist}==1.0"]
        seen_before = len(index.requests)
        assert index.requests and all(ok for _, ok in index.requests)

        other = _second_account(ctx)
        theirs = run_script(
            script,
            requirements=f"--index-url {index.url(credentials=False)}\n{dist}\n",
            account_id=other,
        )
        # The index was asked (no cache answered for it), and said no; B is told so.
        assert (f"/simple/{dist}/", False) in index.requests[seen_before:]
        assert theirs["status"] == "build_failed"
        assert theirs["error"] == (
            "dependency install failed: package index 127.0.0.1 refused access "
            "(401 Unauthorized): give its credentials in the index URL"
        )
    assert theirs["environment"] is None and theirs["resolved_dependencies"] is None

    # A's download is in A's own uv cache only, never in the one every account shares.
    assert _files_named(ctx.settings.account_uv_cache_dir(account.id), dist)
    assert not _files_named(ctx.settings.uv_cache_dir, dist)
    assert not _files_named(ctx.settings.account_uv_cache_dir(other), dist + "-1.0")

    # Neither log tells of downloads (so of what the host's cache held) or shows a password.
    for execution in (mine, theirs):
        text = stored_log(ctx, execution["execution_id"])
        for word in ("Downloading", "Downloaded", "Prepared", index.password):
            assert word not in text, (word, text)
    assert "Installed 1 package" in stored_log(ctx, mine["execution_id"])


def test_default_index_sets_still_share_the_hosts_cache(ctx, run_script):
    result = run_script("import six\n", requirements="six==1.16.0\n")
    assert result["status"] == "succeeded", result["error"]
    assert _files_named(ctx.settings.uv_cache_dir, "six")


LOCAL_SERVICES = (5432, 6379)


def test_an_index_on_a_local_service_port_is_refused_in_one_sentence(ctx, account):
    strict = replace(ctx.settings, allowed_indexes=())
    messages = set()
    for port in LOCAL_SERVICES:
        with session_scope(ctx.session_factory) as session, pytest.raises(BadInput) as refused:
            svc.create_execution(
                session,
                ctx.store,
                strict,
                account_id=account.id,
                script="pass\n",
                script_name="job.py",
                requirements=f"--index-url http://127.0.0.1:{port}/simple\nsix\n",
            )
        messages.add(refused.value.message)
    assert messages == {
        "package index 127.0.0.1 is not allowed on this server "
        "(the operator's RGRID_ALLOWED_INDEXES lists the allowed ones)"
    }


def test_the_worker_refuses_a_source_the_operator_stopped_allowing(ctx, submit):
    execution_id = submit("pass\n", requirements="--index-url http://127.0.0.1:6379/simple\nsix\n")
    strict = replace(ctx, settings=replace(ctx.settings, allowed_indexes=()))
    run_all(strict, execution_id)
    with session_scope(ctx.session_factory) as session:
        row = session.get(svc.Execution, execution_id)
        assert row.status == "build_failed"
        assert row.error.startswith("package index 127.0.0.1 is not allowed on this server")


def test_whatever_listens_on_an_allowed_index_it_is_just_unreachable(ctx, run_script, monkeypatch):
    # uv's retries only make each failure slower; the words are the same.
    monkeypatch.setenv("UV_HTTP_RETRIES", "0")
    errors, logs = set(), []
    for port in (*LOCAL_SERVICES, free_port()):
        result = run_script(
            "pass\n", requirements=f"--index-url http://127.0.0.1:{port}/simple\nsix\n"
        )
        assert result["status"] == "build_failed"
        errors.add(result["error"])
        logs.append(stored_log(ctx, result["execution_id"]))
    assert errors == {"dependency install failed: package index 127.0.0.1 could not be reached"}
    for text in logs:
        for telltale in ("HTTP version", "connection closed", "Connection refused", "os error"):
            assert telltale not in text, text


def test_users_never_see_internal_exception_text(ctx, submit, monkeypatch, caplog):
    import requests

    from rgrid.host import sandbox_run

    detail = (
        "UnixHTTPConnectionPool(host='localhost', port=None): Read timed out. (read timeout=60)"
    )

    def docker_times_out(*args, **kwargs):
        raise requests.exceptions.ReadTimeout(detail)

    monkeypatch.setattr(sandbox_run, "run", docker_times_out)
    execution_id = submit("print('hi')\n")
    with caplog.at_level("ERROR", logger="rgrid.pipeline.chain"):
        run_all(ctx, execution_id)
    with session_scope(ctx.session_factory) as session:
        shown = svc.execution_to_dict(session.get(svc.Execution, execution_id))
    assert shown["status"] == "error"
    assert shown["error"] == f"internal error while running the script; reference {execution_id}"
    assert "UnixHTTPConnectionPool" not in stored_log(ctx, execution_id)
    # The operator's log keeps the detail, under the same reference.
    kept = [r for r in caplog.records if execution_id in r.getMessage()]
    assert any(detail in r.getMessage() and r.exc_info for r in kept)


def test_errors_meant_for_users_keep_their_words():
    from rgrid.core.errors import BuildError, ServiceUnavailable, user_message

    assert user_message(BuildError("no wheel"), "x", "id1") == "no wheel"
    assert (
        user_message(
            ServiceUnavailable("object store unreachable: http://10.0.0.5:9000"), "x", "id1"
        )
        == "internal error while x; reference id1"
    )
    assert user_message(KeyError("k"), "storing the results", "id2") == (
        "internal error while storing the results; reference id2"
    )
