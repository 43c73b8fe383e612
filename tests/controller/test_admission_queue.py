"""Queued admission (services/controller/admission_queue.py, pure): first come first served, refused with the
reason after the longest wait, dropped when nobody asks any more, bounded, and only for capacity refusals."""

from __future__ import annotations

from services.controller.admission_queue import ABANDONED_AFTER_POLLS, QUEUE_POLL_S, AdmissionQueue

FULL = "no capacity: 16.0 items/s for 2 streams vs 10.0 sustainable"


def test_a_refused_stream_waits_and_is_admitted_when_room_frees_first_come_first_served():
    q = AdmissionQueue(max_wait_s=60, max_streams=8)
    assert q.verdict("a", True, "", 0.0).state == "admit"  # nobody waits: as without a queue
    v = q.verdict("b", False, FULL, 1.0)
    assert v.state == "queued" and v.position == 1 and v.message.startswith("queued: position 1 of 1")
    assert FULL in v.message
    assert q.verdict("c", False, FULL, 2.0).position == 2
    # room frees for one: c asks first, but b waits before it (a later small stream never overtakes)
    v = q.verdict("c", True, "", 3.0)
    assert v.state == "queued" and v.position == 2 and "1 stream waiting before it" in v.message
    assert q.verdict("b", True, "", 3.5).state == "admit"
    assert q.position("b") is None and q.position("c") == 1
    assert q.verdict("c", True, "", 4.0).state == "admit" and not q.waiting
    # a newcomer that fits joins the tail while others wait
    q.verdict("d", False, FULL, 5.0)
    assert q.verdict("e", True, "", 5.0).state == "queued" and q.position("e") == 2


def test_refused_with_the_reason_after_the_longest_wait():
    q = AdmissionQueue(max_wait_s=10, max_streams=8)
    q.verdict("a", False, FULL, 0.0)
    assert q.verdict("a", False, FULL, 9.0).state == "queued"
    v = q.verdict("a", False, FULL, 10.5)
    assert v.state == "refuse" and v.message == f"no capacity after waiting 10 s in the admission queue: {FULL}"
    assert q.position("a") is None
    # the tick refuses one that waited too long without asking again, and one whose publisher left
    q.verdict("b", False, FULL, 20.0)
    q.verdict("c", False, FULL, 20.0)
    for t in range(21, 31):
        q.verdict("b", False, FULL, float(t))  # b's ingest keeps asking, c's stopped
    gone = q.expire(20.0 + ABANDONED_AFTER_POLLS * QUEUE_POLL_S + 0.5)
    assert [sid for sid, _ in gone] == ["c"] and "the publisher went away" in gone[0][1]
    assert q.expire(30.5) == []  # b waited past 10 s but still asks: its next ask takes the refusal
    v = q.verdict("b", False, FULL, 31.0)
    assert v.state == "refuse" and v.message == f"no capacity after waiting 10 s in the admission queue: {FULL}"
    assert not q.waiting


def test_bounded_and_only_for_capacity_refusals():
    q = AdmissionQueue(max_wait_s=60, max_streams=2)
    too_slow = "too slow for its latency SLO: one chunk takes ≈ 900 ms here"
    v = q.verdict("x", False, too_slow, 0.0)
    assert v.state == "refuse" and v.message == too_slow and not q.waiting  # waiting cannot cure it
    q.verdict("a", False, FULL, 0.0)
    q.verdict("b", False, FULL, 0.0)
    v = q.verdict("c", False, FULL, 0.0)
    assert v.state == "refuse" and "admission queue is full (2 streams wait)" in v.message
    assert list(q.waiting) == ["a", "b"]
    assert q.remove("a") and q.position("b") == 1  # a stream deleted or ended leaves the queue
