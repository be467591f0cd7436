"""`rgrid why`: whether an execution ran or was answered from the output cache, and why,
compared part by part (rgrid/pipeline/reuse_key.py) with the nearest earlier run of its
script name."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from rgrid.core.models import Execution
from rgrid.core.statuses import Status


def nearest_earlier(session: Session, execution: Execution) -> Execution | None:
    """The account's latest run of the same script name before this one that has a key's
    parts (what Bazel's execution log and Nextflow's -dump-hashes compare against). A batch's
    execution is compared with the latest earlier one made for the same input path, if any
    (the batch's other inputs would all differ)."""
    query = (
        select(Execution)
        .where(
            Execution.account_id == execution.account_id,
            Execution.script_name == execution.script_name,
            Execution.created_at < execution.created_at,
            Execution.action_parts.is_not(None),
            Execution.id != execution.id,
        )
        .order_by(Execution.created_at.desc())
        .limit(1)
    )
    if execution.batch_item is not None:
        same_input = session.scalars(query.where(Execution.batch_item == execution.batch_item))
        if (found := same_input.first()) is not None:
            return found
    return session.scalars(query).first()


def _pin_names(pins: list[str] | None) -> dict[str, str]:
    import re

    found = {}
    for pin in pins or []:
        name = re.split(r"[=<>!~ ;@\[]", pin, maxsplit=1)[0].strip().lower()
        found[name] = pin
    return found


def differences(this: Execution, earlier: Execution) -> list[str]:
    """Which parts of the action key differ, in a user's words."""
    new, old = this.action_parts or {}, earlier.action_parts or {}
    said: list[str] = []
    if new.get("salt") != old.get("salt"):
        said.append("the operator's action-cache salt changed (every entry was disowned)")
    said += _runtime_differences(new, old)
    if new.get("source") != old.get("source"):
        said.append(f"the script {this.script_name} changed")
    said += _requirement_differences(this, earlier, new, old)
    if new.get("inputs") != old.get("inputs"):
        said += _input_differences(this, earlier)
    if new.get("args") != old.get("args"):
        said += _argument_differences(this, earlier)
    said += _env_differences(new.get("env") or {}, old.get("env") or {})
    if new.get("workdir") != old.get("workdir"):
        said.append("the working-directory layout differs")
    return said


def _runtime_differences(new: dict, old: dict) -> list[str]:
    if new.get("runtime") != old.get("runtime"):
        return [f"runtime {new.get('runtime')} instead of {old.get('runtime')}"]
    if new.get("runtime_image") != old.get("runtime_image"):
        return [
            f"runtime image {(new.get('runtime_image') or 'unknown')[:19]} instead of"
            f" {(old.get('runtime_image') or 'unknown')[:19]}"
        ]
    return []


def _requirement_differences(
    this: Execution, earlier: Execution, new: dict, old: dict
) -> list[str]:
    """The requirements themselves, or else how they resolved: pin by pin."""
    if new.get("requirements") != old.get("requirements"):
        return ["the requirements changed"]
    if new.get("resolution") == old.get("resolution"):
        return []
    now = _pin_names(this.resolved_dependencies)
    then = _pin_names(earlier.resolved_dependencies)
    changed = [
        f"{now[name]} instead of {then[name]}"
        for name in sorted(now.keys() & then.keys())
        if now[name] != then[name]
    ]
    changed += [f"{now[name]} added" for name in sorted(now.keys() - then.keys())]
    changed += [f"{then[name]} dropped" for name in sorted(then.keys() - now.keys())]
    if new.get("resolution") is None:
        return ["the requirements were not resolved yet (or --refresh-deps)"]
    if changed:
        return ["requirements resolved to " + ", ".join(changed)]
    return ["the requirements resolved differently"]


def _input_differences(this: Execution, earlier: Execution) -> list[str]:
    now_in = {item["path"]: item["sha256"] for item in this.inputs or []}
    then_in = {item["path"]: item["sha256"] for item in earlier.inputs or []}
    said = []
    for path in sorted(now_in.keys() | then_in.keys()):
        if path not in then_in:
            said.append(f"input {path} added")
        elif path not in now_in:
            said.append(f"input {path} removed")
        elif now_in[path] != then_in[path]:
            said.append(f"input {path} changed")
    return said


def _argument_differences(this: Execution, earlier: Execution) -> list[str]:
    now_args, then_args = list(this.args or []), list(earlier.args or [])
    said = []
    if len(now_args) != len(then_args):
        said.append(f"{len(now_args)} argument(s) instead of {len(then_args)}")
    said += [
        f"argument {number} differs"
        for number, (a, b) in enumerate(zip(now_args, then_args, strict=False), start=1)
        if a != b
    ]
    return said


def _env_differences(now_env: dict, then_env: dict) -> list[str]:
    said = []
    for name in sorted(now_env.keys() | then_env.keys()):
        if name not in then_env:
            said.append(f"--env {name} added")
        elif name not in now_env:
            said.append(f"--env {name} removed")
        elif now_env[name] != then_env[name]:
            said.append(f"--env {name} has another value")
    return said


def explain(session: Session, execution: Execution) -> dict:
    """`rgrid why`: whether the execution ran or was reused, and why, compared part by part
    with the nearest earlier run of its script name."""
    earlier = nearest_earlier(session, execution)
    reasons: list[str] = []
    if execution.reused_from:
        verdict = f"reused {execution.reused_from}: every part of its action key was unchanged"
    else:
        verdict = "ran"
        if execution.stdin:
            reasons.append("it read forwarded stdin: such a run is never reused")
        if execution.output_cache_hit is None and not execution.stdin:
            reasons.append("it was not asked to reuse (--reuse, or it ran with --refresh)")
    diffs = differences(execution, earlier) if earlier is not None else []
    if earlier is None:
        reasons.append(f"no earlier run of {execution.script_name} to compare with")
    elif not diffs and not execution.reused_from:
        if earlier.status != Status.SUCCEEDED:
            reasons.append(
                f"nothing differed, but {earlier.id} ended {earlier.status}: only succeeded"
                " runs are reused"
            )
        elif execution.output_cache_hit is False:
            reasons.append(f"nothing differed, but {earlier.id}'s result was no longer stored")
    return {
        "execution_id": execution.id,
        "script_name": execution.script_name,
        "verdict": verdict,
        "reused_from": execution.reused_from,
        "output_cache_hit": execution.output_cache_hit,
        "compared_with": earlier.id if earlier is not None else None,
        "compared_status": earlier.status if earlier is not None else None,
        "differences": diffs,
        "reasons": reasons,
        "action_key": execution.action_key,
    }
