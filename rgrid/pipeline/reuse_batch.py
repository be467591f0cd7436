"""The output cache for a batch: a page of new executions looked up at once (one query for the
entries, one for their blobs, parallel HEADs), each hit answered as a single run is
(rgrid/pipeline/reuse.py), the rows inserted together afterwards."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from rgrid.core import cache_keys, metrics
from rgrid.core.config import Settings
from rgrid.core.models import Blob, OutputCache, utcnow
from rgrid.pipeline.reuse import answered_columns, wanted
from rgrid.pipeline.reuse_key import key_of, key_parts, known_resolution, resolution
from rgrid.store import blobs
from rgrid.store.objectstore import ObjectStore, exists_many


def lookup_many(session: Session, account_id: int, keys: list[str]) -> dict[str, OutputCache]:
    """The account's entries of these keys, by key: one indexed query for a page (at most
    1,000 keys), not one per execution."""
    found: dict[str, OutputCache] = {}
    keys = list(dict.fromkeys(keys))
    for start in range(0, len(keys), 1000):
        chunk = keys[start : start + 1000]
        for entry in session.scalars(
            select(OutputCache).where(
                OutputCache.account_id == account_id, OutputCache.action_key.in_(chunk)
            )
        ):
            found[entry.action_key] = entry
    return found


def _stored_entries(
    session: Session, store: ObjectStore, account_id: int, entries: list[OutputCache]
) -> tuple[set[int], dict[str, Blob]]:
    """Which entries still have their log and every output blob in the store (what
    ``still_stored`` checks for one, here in one blob query and parallel HEADs), and the
    blobs found, by digest."""
    digests = [o["sha256"] for entry in entries for o in entry.outputs or []]
    found = blobs.blobs_for(session, account_id, digests)
    keys = [cache_keys.log_object_key(entry.execution_id) for entry in entries]
    keys += [blob.object_key for blob in found.values()]
    present = exists_many(store, keys)  # a LIST for a batch's logs, else HEADs
    good = set()
    for entry in entries:
        if not present.get(cache_keys.log_object_key(entry.execution_id)):
            continue
        if all(
            (blob := found.get(o["sha256"])) is not None and present.get(blob.object_key)
            for o in entry.outputs or []
        ):
            good.add(entry.id)
    return good, found


#: The columns a batch page's rows all carry, so that they go in as one multi-row INSERT
#: (a hit fills them in; a miss leaves them empty for its run).
ANSWER_COLUMNS = (
    "outcome",
    "exit_code",
    "reused_from",
    "output_cache_hit",
    "action_parts",
    "action_key",
    "runtime_image",
    "environment",
    "resolved_dependencies",
    "run_s",
    "started_at",
    "finished_at",
    "dispatched_at",
)


def for_batch(
    session: Session,
    store: ObjectStore | None,
    settings: Settings,
    account_id: int,
    rows: list[dict],
    *,
    reuse: bool | None,
    refresh: bool = False,
    runtime_image=None,
) -> list[str]:
    """A page of a batch's new executions (rows about to be inserted): each gets its action
    key's parts, and with --reuse (or the default) the page is looked up at once (one query
    for the entries, one for their blobs, parallel HEADs) and each hit is answered as a
    single run is (``answer``): succeeded, ``reused_from``, the original's outputs, never
    dispatched. Only the misses are left queued. ``runtime_image``: a callable giving the
    image the run will get for a runtime, called only when looking up. Returns the ids of
    the executions answered."""
    if not rows:
        return []
    now = utcnow()
    for row in rows:
        row.update(dict.fromkeys(ANSWER_COLUMNS))
        row["created_at"] = now
    looking = store is not None and wanted(settings, reuse) and not refresh
    image = runtime_image(rows[0]["runtime"]) if looking and runtime_image else None
    keys, pins, environment = _page_keys(session, settings, account_id, rows, image, looking)
    if not looking:
        return []
    entries = lookup_many(session, account_id, list(keys))
    good, found = _stored_entries(session, store, account_id, list(entries.values()))
    _drop_entries(session, [entry.id for entry in entries.values() if entry.id not in good])
    answered: list[str] = []
    touched: Counter[str] = Counter()
    for key, row in keys.items():
        entry = entries.get(key)
        if entry is None or entry.id not in good:
            continue
        row.update(answered_columns(entry, key, image, environment, pins, now))
        answered.append(row["id"])
        touched.update(o["sha256"] for o in [*(entry.outputs or []), *(row["inputs"] or [])])
        metrics.output_lookup(True, entry.run_s, entry.bytes)
    for _ in range(len(rows) - len(answered)):
        metrics.output_lookup(False)
    hit_ids = [entries[key].id for key in keys if key in entries and entries[key].id in good]
    _touch_entries(session, hit_ids, now)
    _touch_blobs(session, account_id, touched, found, now)
    return answered


def _page_keys(
    session: Session,
    settings: Settings,
    account_id: int,
    rows: list[dict],
    image: str | None,
    looking: bool,
) -> tuple[dict[str, dict], list | None, str | None]:
    """Each row's action key's parts (stored on it for `rgrid why`) and, when looking up, its
    key: (row by key, the page's pins, its environment folder). One runtime, one
    requirements set per batch: one resolution for the page."""
    first = SimpleNamespace(**rows[0], dependency_hash=None)
    pins, environment = known_resolution(session, first)
    resolved = resolution(first, pins)
    keys: dict[str, dict] = {}
    for row in rows:
        probe = SimpleNamespace(**row, dependency_hash=None)
        parts = key_parts(settings, probe, runtime_image=image, resolution=resolved, env={})
        row["action_parts"] = parts
        if looking:
            row["output_cache_hit"] = False
            key = key_of(settings, account_id, parts)
            if key is not None:
                keys[key] = row
    return keys, pins, environment


def _drop_entries(session: Session, gone: list[int]) -> None:
    """Never a partial answer: an entry whose log or blobs are gone is dropped, and its runs
    are misses."""
    if gone:
        session.execute(
            delete(OutputCache)
            .where(OutputCache.id.in_(gone))
            .execution_options(synchronize_session=False)
        )


def _touch_entries(session: Session, hit_ids: list[int], now) -> None:
    """The entries that answered, used once more: one UPDATE for the page."""
    if hit_ids:
        session.execute(
            update(OutputCache)
            .where(OutputCache.id.in_(hit_ids))
            .values(last_used_at=now, use_count=OutputCache.use_count + 1)
            .execution_options(synchronize_session=False)
        )


def _touch_blobs(
    session: Session, account_id: int, uses: Counter[str], known: dict[str, Blob], now
) -> None:
    """Each blob the answered executions use, touched once per use, in a statement per
    distinct count (a page's shared inputs are used by every one of its executions)."""
    if not uses:
        return
    missing = [digest for digest in uses if digest not in known]
    if missing:
        known = {**known, **blobs.blobs_for(session, account_id, missing)}
    by_count: dict[int, list[int]] = {}
    for digest, count in uses.items():
        if (blob := known.get(digest)) is not None:
            by_count.setdefault(count, []).append(blob.id)
    for count, ids in by_count.items():
        session.execute(
            update(Blob)
            .where(Blob.id.in_(ids))
            .values(last_used_at=now, use_count=Blob.use_count + count)
            .execution_options(synchronize_session=False)
        )
