"""Suggestion statistics: ids, events, bounded memory, the all-time file."""

import json

from editkv.lsp_server.stats import MAX_TRACKED, Stats, percentile


def test_events_are_counted_per_kind_and_saved(tmp_path):
    path = tmp_path / "editkv" / "stats.json"
    stats = Stats(path)
    a = stats.new_id("inline", "return x")
    b = stats.new_id("completion", "def f():\n    pass")
    assert stats.event(a, "shown") and stats.event(b, "shown") and stats.event(b, "accepted")
    assert not stats.event(a, "exploded") and not stats.event(5, "shown")
    assert stats.event("never-served", "rejected")  # counted, flagged as unknown
    snap = stats.snapshot()["suggestions"]
    assert (snap["shown"], snap["accepted"], snap["rejected"], snap["unknown_ids"]) == (2, 1, 1, 1)
    assert snap["acceptance_rate"] == 0.5 and snap["by_kind"]["completion"] == {"shown": 1, "accepted": 1}
    stats.save()
    assert json.loads(path.read_text())["events"] == {"shown": 2, "accepted": 1, "rejected": 1}
    again = Stats(path)  # a new server process adds to the totals
    again.event(again.new_id("inline", "x"), "accepted")
    assert again.snapshot()["all_time"] == {"shown": 2, "accepted": 2, "rejected": 1}


def test_memory_is_bounded_and_bad_files_are_ignored(tmp_path):
    path = tmp_path / "stats.json"
    path.write_text('{"events": {"shown": "many", "accepted": -3, "rejected": 4}}')
    stats = Stats(path)
    for i in range(MAX_TRACKED + 50):
        stats.new_id("inline", str(i))
    assert len(stats.served) == MAX_TRACKED
    assert stats.snapshot()["all_time"] == {"shown": 0, "accepted": 0, "rejected": 4}
    Stats(tmp_path / "missing" / "x.json").save()  # creates its folder; never raises


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile(list(range(1, 101)), 95) == 95


def test_acceptance_rate_counts_accepted_among_shown_suggestions_only():
    stats = Stats(None)
    ghost = [stats.new_id("inline", "x") for _ in range(4)]
    for sid in ghost:
        stats.event(sid, "shown")
    stats.event(ghost[0], "accepted")
    stats.event(ghost[0], "accepted")  # a repeated report of the same accept
    for _ in range(3):  # dropdown items accepted without a shown event
        stats.event(stats.new_id("completion", "y"), "accepted")
    late = stats.new_id("inline", "z")
    stats.event(late, "accepted")
    stats.event(late, "shown")  # events may arrive out of order
    snap = stats.snapshot()["suggestions"]
    assert snap["accepted"] == 6 and snap["shown"] == 5
    assert snap["acceptance_rate"] == 0.4  # 2 of the 5 shown, never above 1


def test_a_served_request_is_split_into_waiting_repair_view_and_decode():
    stats = Stats(None)
    stats.served_request(30.0, {"total_ms": 20.0, "repair_ms": 2.0, "view_ms": 3.0})
    stats.served_request(50.0, {"total_ms": 45.0, "repair_ms": 0.0, "view_ms": 5.0})
    stats.served_request(7.0, {})  # a backend that doesn't time itself: only its latency counts
    snap = stats.snapshot()
    assert snap["latency_ms"]["count"] == 3
    phases = snap["phases_ms"]
    assert phases["waiting"]["mean"] == 7.5 and phases["backend"]["mean"] == 32.5
    assert phases["repair"]["mean"] == 1.0 and phases["view"]["mean"] == 4.0 and phases["decode"]["mean"] == 27.5
