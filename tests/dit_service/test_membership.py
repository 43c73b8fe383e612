"""The stage's block-map state machine alone: maps and events in, actions out (no NATS, no ring)."""

from __future__ import annotations

from dit_stage.membership import (
    AbortSwitch,
    AdmitInputs,
    AnnouncePrepared,
    AwaitPeers,
    ConnectNext,
    Go,
    HardSwitch,
    Idle,
    JoinRing,
    LoadBlocks,
    Membership,
    PrepareSwitch,
    Recover,
    SubscribeInputs,
    SwitchDone,
)
from proto import BlockMap, StageAssignment


def _map(epoch: int, split: list[tuple[str, int, int]], reason: str = "initial", created_at: float = 0.0) -> BlockMap:
    return BlockMap(epoch=epoch, num_blocks=split[-1][2], reason=reason, created_at=created_at,
                    stages=[StageAssignment(stage_id=s, block_start=a, block_end=b) for s, a, b in split])


E0 = _map(0, [("a", 0, 2), ("b", 2, 4), ("c", 4, 5)])
E1 = _map(1, [("a", 0, 1), ("b", 1, 2), ("c", 2, 5)], reason="rebalance")
E2 = _map(2, [("a", 0, 3), ("b", 3, 4), ("c", 4, 5)], reason="rebalance")


def _running(stage: str, bm: BlockMap = E0) -> Membership[str]:
    m: Membership[str] = Membership(stage)
    m.on_map(bm)
    m.loaded(bm.epoch)
    return m


def test_first_map_loads_the_range_then_switches_hard_and_connects():
    m: Membership[str] = Membership("b")
    assert m.on_map(E0) == [LoadBlocks(0, (2, 4), 5, hard=True)]
    assert m.loaded(0) == [HardSwitch(E0, (2, 4), True, "no blocks loaded"), SubscribeInputs(first=False),
                           ConnectNext("c", 0), AdmitInputs(0), AnnouncePrepared(0)]
    assert m.applied == E0 and m.blocks == (2, 4, 5)
    last: Membership[str] = Membership("c")
    last.on_map(E0)
    assert last.loaded(0)[1:3] == [SubscribeInputs(first=False), ConnectNext("a", 0)]  # ring returns go to the first


def test_the_same_map_again_does_nothing():
    m = _running("a")
    assert m.on_map(E0.model_copy(update={"created_at": 99.0})) == []


def test_online_rebalance_prepares_moves_then_switches_when_every_stage_is_prepared():
    m = _running("a")
    assert m.on_map(E1) == [AdmitInputs(1), LoadBlocks(1, (0, 1), 5, hard=False)]
    assert m.loaded(1) == [PrepareSwitch(E1, (0, 1), send={"b": [1]}, receive={}, relink_to=None)]
    assert m.switching is None  # the worker has not been told yet
    assert m.switch_prepared(1) == [AnnouncePrepared(1), AwaitPeers(E1)]
    assert m.switching == 1
    assert m.peers_prepared(1) == [Go(1)]
    assert m.switched(1) == [SwitchDone(E1, (0, 1))]
    assert m.applied == E1 and m.blocks == (0, 1, 5) and m.switching is None
    c = _running("c")
    assert c.on_map(E1)[-1] == LoadBlocks(1, (2, 5), 5, hard=False)
    assert c.loaded(1) == [PrepareSwitch(E1, (2, 5), send={}, receive={"b": [2, 3]}, relink_to=None)]
    assert c.switch_prepared(1) == [AnnouncePrepared(1)]  # only the first stage waits for the others


def test_a_join_after_a_stage_relinks_and_the_joiner_waits_for_moves():
    joined = _map(1, [("a", 0, 2), ("x", 2, 3), ("b", 3, 5)], reason="join")
    a = _running("a", _map(0, [("a", 0, 3), ("b", 3, 5)]))
    a.on_map(joined)
    assert a.loaded(1) == [PrepareSwitch(joined, (0, 2), send={"x": [2]}, receive={}, relink_to="x")]
    x: Membership[str] = Membership("x")
    assert x.on_map(joined) == [LoadBlocks(1, (2, 3), 5, hard=False)]
    assert x.loaded(1) == [JoinRing(joined, (2, 3)), SubscribeInputs(first=False), ConnectNext("b", 1),
                           AdmitInputs(1), AnnouncePrepared(1)]
    assert x.switching == 1
    assert x.switched(1) == [SwitchDone(joined, (2, 3))]


def test_a_failure_map_switches_hard_and_recovers():
    failure = _map(1, [("a", 0, 3), ("c", 3, 5)], reason="failure")
    c = _running("c")
    assert c.on_map(failure) == [LoadBlocks(1, (3, 5), 5, hard=True)]
    actions = c.loaded(1)
    assert actions[:2] == [HardSwitch(failure, (3, 5), True, "reason 'failure'"), Recover(1)]
    # the link re-targets before the held inputs of the new epoch are admitted: a replayed item must never be
    # queued to the link about to be replaced (it was, and died with it)
    assert actions[2:] == [SubscribeInputs(first=False), ConnectNext("a", 1), AdmitInputs(1), AnnouncePrepared(1)]
    same_range = _map(2, [("a", 0, 3), ("c", 3, 5)], reason="failure")
    assert c.on_map(same_range)[:2] == [HardSwitch(same_range, (3, 5), False, "reason 'failure'"), Recover(2)]


def test_a_hard_map_replaces_a_pending_online_switch_at_once():
    m = _running("b")
    m.on_map(E1)
    m.loaded(1)
    m.switch_prepared(1)
    failure = _map(2, [("a", 0, 3), ("b", 3, 5)], reason="failure")
    actions = m.on_map(failure)
    assert actions[0] == AbortSwitch(1)
    assert actions[1] == LoadBlocks(2, (3, 5), 5, hard=True)  # from the blocks it runs, the old epoch's
    assert m.switched(1) == [] and m.switching is None  # a late completion of the abandoned switch is ignored


def test_a_stage_left_out_of_the_map_goes_idle():
    m = _running("c")
    gone = _map(1, [("a", 0, 3), ("b", 3, 5)], reason="failure")
    assert m.on_map(gone) == [Idle(gone), SubscribeInputs(first=False)]
    assert m.blocks is None
    assert m.on_map(_map(2, [("a", 0, 2), ("b", 2, 4), ("c", 4, 5)]))[-1] == LoadBlocks(2, (4, 5), 5, hard=True)


def test_maps_apply_in_order_behind_a_pending_switch():
    m = _running("a")
    m.on_map(E1)
    m.loaded(1)
    m.switch_prepared(1)
    assert m.on_map(E2) == [AdmitInputs(2)]  # queued: epoch 1 is not done here yet
    assert m.peers_prepared(1) == [Go(1)]
    done = m.switched(1)
    assert done == [SwitchDone(E1, (0, 1)), LoadBlocks(2, (0, 3), 5, hard=False)]
    assert m.loaded(2) == [PrepareSwitch(E2, (0, 3), send={}, receive={"b": [1], "c": [2]}, relink_to=None)]


def test_early_inputs_are_admitted_only_once_their_epoch_applies():
    m: Membership[str] = Membership("a", early_queue=2)
    assert m.admits(0) and not m.admits(1)  # epoch 0 needs no map to be admitted (the worker then drops it)
    first = _map(1, [("a", 0, 2), ("b", 2, 5)])
    m.on_map(first)
    assert m.hold("x") == 0
    assert AdmitInputs(1) in m.loaded(1)
    assert m.release(1) == ["x"] and m.admits(1) and not m.admits(2)
    assert [m.hold(s) for s in ("p", "q", "r")] == [0, 0, 1]  # the oldest goes beyond the cap
    failure = _map(2, [("a", 0, 3), ("b", 3, 5)], reason="failure")
    actions = m.on_map(failure)
    assert AdmitInputs(2) not in actions  # not before the hard switch of epoch 2 is applied
    assert AdmitInputs(2) in m.loaded(2)
    assert m.release(2) == ["q", "r"] and m.admits(2)


def test_a_failed_load_abandons_its_map_and_the_next_one_applies():
    m = _running("b")
    m.on_map(E1)
    assert m.failed(1) == [AbortSwitch(1)]  # its weights could not be loaded
    assert m.applied == E0 and m.blocks == (2, 4, 5)
    failure = _map(2, [("a", 0, 2), ("b", 2, 5)], reason="failure")
    m.on_map(failure)
    assert m.failed(2) == []  # a hard reload that failed: nothing to abort, the stage keeps what it runs
    assert m.on_map(E0.model_copy(update={"epoch": 3}))[0] == HardSwitch(E0.model_copy(update={"epoch": 3}), (2, 4),
                                                                          False, "reason 'initial'")
