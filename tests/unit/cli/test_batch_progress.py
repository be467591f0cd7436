"""The batch progress bar's counts: reused executions (answered from earlier runs with
--reuse, nothing ran) are counted apart from those that ran."""

from rgrid.cli.batch_follow import Follower


def _text(status: dict) -> str:
    follower = Follower(client=None, batch_id="b", json_mode=True)  # type: ignore[arg-type]
    follower.status = status
    return follower.counts_text()


def test_reused_ones_are_counted_apart():
    status = {"counts": {"succeeded": 995, "running": 3, "queued": 2}, "reused": 990}
    assert _text(status) == "990 reused · 5 done · 0 failed · 3 running · 2 queued"


def test_without_reuse_the_bar_reads_as_before():
    status = {"counts": {"succeeded": 4, "failed": 1}, "reused": 0}
    assert _text(status) == "4 done · 1 failed · 0 running · 0 queued"
    assert _text({"counts": {"queued": 3}}) == "0 done · 0 failed · 0 running · 3 queued"
