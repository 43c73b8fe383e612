"""The partitioner: the DP's optimum equals brute force over every contiguous split; ties and memory behave."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto import BlockMap
from services.controller.partition import PartitionProblem, Stage, best_split, evaluate, even_split


def _all_splits(nb: int, n: int):
    for cuts in itertools.combinations(range(1, nb), n - 1):
        edges = (0, *cuts, nb)
        yield [(edges[i], edges[i + 1]) for i in range(n)]


def _brute(problem: PartitionProblem) -> float:
    best = math.inf
    for ranges in _all_splits(problem.num_blocks, len(problem.stages)):
        if any((b - a) * problem.bytes_per_block > problem.stages[i].memory_bytes for i, (a, b) in enumerate(ranges)):
            continue
        best = min(best, evaluate(problem, ranges).bottleneck_ms)
    return best


@st.composite
def problems(draw) -> PartitionProblem:
    nb = draw(st.integers(1, 9))
    n = draw(st.integers(1, min(nb, 4)))
    costs = draw(st.lists(st.floats(0.1, 50.0), min_size=nb, max_size=nb))
    speeds = draw(st.lists(st.floats(0.25, 4.0), min_size=n, max_size=n))
    per_block = draw(st.sampled_from([0.0, 1.0]))
    mem = draw(st.lists(st.one_of(st.just(math.inf), st.integers(0, nb).map(float)), min_size=n, max_size=n))
    return PartitionProblem(costs, [Stage(f"dit-{i}", speeds[i], mem[i]) for i in range(n)],
                            first_extra_ms=draw(st.floats(0.0, 20.0)), last_extra_ms=draw(st.floats(0.0, 20.0)),
                            bytes_per_block=per_block)


@settings(max_examples=300, deadline=None)
@given(problems())
def test_dp_matches_brute_force(problem: PartitionProblem) -> None:
    want = _brute(problem)
    got = best_split(problem)
    if want == math.inf:
        assert got is None
        return
    assert got is not None
    assert got.bottleneck_ms == pytest.approx(want, rel=1e-9)
    ids = [s.stage_id for s in problem.stages]
    BlockMap(epoch=1, num_blocks=problem.num_blocks, stages=got.assignments(ids)).validate_cover()
    for i, (a, b) in enumerate(got.ranges):
        assert b > a and (b - a) * problem.bytes_per_block <= problem.stages[i].memory_bytes


@settings(max_examples=100, deadline=None)
@given(problems(), st.data())
def test_ties_prefer_the_fewest_moved_blocks(problem: PartitionProblem, data) -> None:
    ids = [s.stage_id for s in problem.stages]
    if problem.num_blocks < len(ids):
        return
    current = {a.stage_id: (a.block_start, a.block_end) for a in even_split(problem.num_blocks, ids)}
    got = best_split(problem, current)
    if got is None:
        return
    bound = got.bottleneck_ms * (1 + 1e-9)

    def moved(ranges) -> int:
        return sum(1 for i, (a, b) in enumerate(ranges) for blk in range(a, b)
                   if not current[ids[i]][0] <= blk < current[ids[i]][1])

    best_moves = min(moved(r) for r in _all_splits(problem.num_blocks, len(ids))
                     if evaluate(problem, r).bottleneck_ms <= bound
                     and all((b - a) * problem.bytes_per_block <= problem.stages[i].memory_bytes
                             for i, (a, b) in enumerate(r)))
    assert moved(got.ranges) == best_moves


def test_a_slow_stage_gets_fewer_blocks_and_extras_count() -> None:
    stages = [Stage("dit-0"), Stage("dit-1", speed=2.0), Stage("dit-2")]
    got = best_split(PartitionProblem([1.0] * 12, stages))
    assert got is not None and got.ranges == ((0, 5), (5, 7), (7, 12)) and got.bottleneck_ms == 5.0
    even = evaluate(PartitionProblem([1.0] * 12, stages), [(0, 4), (4, 8), (8, 12)])
    assert even.bottleneck_ms == 8.0
    # patch embed on the first stage and the head on the last push blocks to the middle
    got = best_split(PartitionProblem([1.0] * 9, [Stage("a"), Stage("b"), Stage("c")], first_extra_ms=2.0,
                                      last_extra_ms=2.0))
    assert got is not None and got.bottleneck_ms == 5.0 and got.ranges[1][1] - got.ranges[1][0] >= 4


def test_unequal_blocks_and_memory_limits() -> None:
    got = best_split(PartitionProblem([10.0, 1.0, 1.0, 1.0, 1.0, 1.0], [Stage("a"), Stage("b")]))
    assert got is not None and got.ranges == ((0, 1), (1, 6))
    # b may hold only 2 blocks: a must take the rest although it is slower then
    got = best_split(PartitionProblem([1.0] * 6, [Stage("a"), Stage("b", memory_bytes=2.0)], bytes_per_block=1.0))
    assert got is not None and got.ranges == ((0, 4), (4, 6))
    assert best_split(PartitionProblem([1.0] * 6, [Stage("a", memory_bytes=2.0), Stage("b", memory_bytes=2.0)],
                                       bytes_per_block=1.0)) is None
    with pytest.raises(ValueError, match="at least one"):
        best_split(PartitionProblem([1.0], [Stage("a"), Stage("b")]))
