"""PairSampler: shape-pure batches, the same ids across model-parallel ranks, disjoint across data-parallel
ranks, deterministic in (seed, epoch, rank), exact mid-epoch resume."""
from __future__ import annotations

import itertools

import pytest

from megatron_regdpo.data.sampler import PairSampler

SHAPES = [(16, 3, 4, 4)] * 13 + [(16, 3, 4, 7)] * 9 + [(16, 5, 4, 4)] * 5      # 27 pairs, 3 shapes


def _epoch(sampler):
    return list(iter(sampler))


def test_batches_never_mix_shapes_and_ranks_are_disjoint():
    ranks = [PairSampler(SHAPES, micro_batch=2, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    steps = [_epoch(s) for s in ranks]
    assert len(steps[0]) == len(steps[1]) == ranks[0].steps_per_epoch() == 13 // 4 + 9 // 4 + 5 // 4
    for a, b in zip(*steps):
        assert len(a) == len(b) == 2 and not set(a) & set(b)
        assert len({SHAPES[i] for i in a + b}) == 1               # one shape per global batch
    seen = list(itertools.chain(*steps[0], *steps[1]))
    assert len(seen) == len(set(seen))                            # no pair twice in an epoch


def test_model_parallel_peers_agree_and_epochs_differ():
    a = PairSampler(SHAPES, 2, dp_rank=1, dp_size=2, seed=3)
    b = PairSampler(SHAPES, 2, dp_rank=1, dp_size=2, seed=3)      # e.g. the other TP rank of the same DP rank
    first = _epoch(a)
    assert first == _epoch(b)
    assert _epoch(a) != first and a.epoch == 2                    # the next epoch is shuffled anew
    assert _epoch(PairSampler(SHAPES, 2, 1, 2, seed=4)) != _epoch(PairSampler(SHAPES, 2, 1, 2, seed=3))


def test_resume_mid_epoch_is_exact():
    full = PairSampler(SHAPES, 2, 0, 2, seed=7)
    reference = _epoch(full) + _epoch(full)                       # two epochs
    run = PairSampler(SHAPES, 2, 0, 2, seed=7)
    it = iter(run)
    taken = [next(it) for _ in range(4)]
    state = run.state_dict()
    resumed = PairSampler(SHAPES, 2, 0, 2, seed=7)
    resumed.load_state_dict(state)
    assert taken + _epoch(resumed) + _epoch(resumed) == reference
    with pytest.raises(ValueError, match="another pair list or seed"):
        PairSampler(SHAPES[:-1], 2, 0, 2, seed=7).load_state_dict(state)


def test_bad_arguments():
    with pytest.raises(ValueError, match="dp_rank=2"):
        PairSampler(SHAPES, 1, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="pairs one global batch needs"):
        PairSampler(SHAPES, 8, 0, 2)


PROBE = [(16, 3, 8, 14)] * 5 + [(16, 3, 14, 8)] * 2           # the probe: 2 of 7 clips in a small bucket


def test_small_buckets_are_named():
    """Under "drop" a shape with fewer pairs than a global batch is never trained: the sampler names it."""
    s = PairSampler(PROBE, micro_batch=1, dp_rank=0, dp_size=4)
    assert s.small_buckets() == {(16, 3, 14, 8): 2}
    trained = {i for _ in range(5) for b in _epoch(s) for i in b}
    assert trained.isdisjoint({5, 6})


def test_repeat_trains_every_pair_every_epoch_and_resumes_exactly():
    ranks = [PairSampler(PROBE, 1, r, 4, seed=5, small_buckets="repeat") for r in range(4)]
    steps = [_epoch(s) for s in ranks]
    assert ranks[0].steps_per_epoch() == len(steps[0]) == 2 + 1
    for batch in zip(*steps):
        ids = [i for ids in batch for i in ids]
        assert len(ids) == 4 and len({PROBE[i] for i in ids}) == 1
    assert {i for rank in steps for b in rank for i in b} == set(range(7))
    full = PairSampler(PROBE, 1, 2, 4, seed=5, small_buckets="repeat")
    reference = _epoch(full) + _epoch(full)
    run = PairSampler(PROBE, 1, 2, 4, seed=5, small_buckets="repeat")
    it = iter(run)
    taken = [next(it) for _ in range(2)]
    resumed = PairSampler(PROBE, 1, 2, 4, seed=5, small_buckets="repeat")
    resumed.load_state_dict(run.state_dict())
    assert taken + _epoch(resumed) + _epoch(resumed) == reference
    with pytest.raises(ValueError, match="another pair list or seed"):   # a "drop" state resumes no "repeat" run
        PairSampler(PROBE, 1, 2, 4, seed=5).load_state_dict(run.state_dict())


def test_a_refused_state_says_what_changed():
    """The checkpoint's sampler state records its pair count and mode, so a refusal can name the change."""
    state = PairSampler(SHAPES, 2, 0, 2, seed=7).state_dict()
    with pytest.raises(ValueError, match=f"{len(SHAPES)} training pairs then, {len(SHAPES) + 2} now"):
        PairSampler(SHAPES + SHAPES[:2], 2, 0, 2, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="seed 7 then, 8 now"):
        PairSampler(SHAPES, 2, 0, 2, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="small buckets 'drop' then, 'repeat' now"):
        PairSampler(SHAPES, 2, 0, 2, seed=7, small_buckets="repeat").load_state_dict(state)
    old = {k: state[k] for k in ("epoch", "step", "seed", "fingerprint")}     # written before the count was kept
    with pytest.raises(ValueError, match="does not record how many then"):
        PairSampler(SHAPES[::-1], 2, 0, 2, seed=7).load_state_dict(old)
    PairSampler(SHAPES, 2, 0, 2, seed=7).load_state_dict(old)                   # and still resumes its own list


def _global_steps(ranks: list[PairSampler], steps: int) -> list[list[int]]:
    """`steps` global batches drawn by all data-parallel ranks together (each rank's slice, in rank order),
    epoch after epoch as the trainer draws them."""
    def endless(sampler):
        while True:
            yield from sampler

    iters = [endless(s) for s in ranks]
    return [[i for it in iters for i in next(it)] for _ in range(steps)]


@pytest.mark.parametrize("mode", ["drop", "repeat"])
@pytest.mark.parametrize("before,after", [(2, 1), (1, 4), (4, 2)])
def test_another_data_parallel_size_continues_the_same_global_batches(mode, before, after):
    """The global batches depend on (seed, epoch, global batch) only and the state is a global step: a resume
    at another DP size with the same global batch repeats and skips no pair, mid-epoch and across epochs."""
    total = PairSampler(SHAPES, 4, 0, 1, seed=7, small_buckets=mode).steps_per_epoch() * 2   # two epochs
    def ranks(dp):
        return [PairSampler(SHAPES, 4 // dp, r, dp, seed=7, small_buckets=mode) for r in range(dp)]

    reference = _global_steps(ranks(1), total)
    for cut in (3, total // 2):   # mid-epoch, and (steps_per_epoch) an epoch boundary
        first = ranks(before)
        taken = _global_steps(first, cut)
        states = [s.state_dict() for s in first]
        assert all(s == states[0] for s in states) and states[0]["global_batch"] == 4
        resumed = ranks(after)
        for s in resumed:
            s.load_state_dict(states[0])
        assert taken + _global_steps(resumed, total - cut) == reference


def test_another_global_batch_is_refused_and_old_states_load():
    from megatron_regdpo.data.sampler import GlobalBatchChanged

    run = PairSampler(SHAPES, 2, 0, 2, seed=7)
    next(iter(run))
    state = run.state_dict()
    with pytest.raises(GlobalBatchChanged, match="global batches of 4 pairs, this run's global batch is 2 pairs"):
        PairSampler(SHAPES, 1, 0, 2, seed=7).load_state_dict(state)
    assert issubclass(GlobalBatchChanged, ValueError)
    old = {k: v for k, v in state.items() if k != "global_batch"}   # written before the global batch was kept
    PairSampler(SHAPES, 4, 0, 1, seed=7).load_state_dict(old)


@pytest.mark.parametrize("mode", ["drop", "repeat"])
def test_peek_is_the_next_micro_batch_and_moves_nothing(mode):
    """Across epoch ends and after a resume: peek() equals what iterating yields next; the state stays."""
    sampler = PairSampler(SHAPES, 2, dp_rank=1, dp_size=2, seed=3, small_buckets=mode)
    it, seen = iter(sampler), 0
    while seen < 3 * sampler.steps_per_epoch() + 2:
        state = sampler.state_dict()
        peeked = sampler.peek()
        assert sampler.state_dict() == state
        try:
            got = next(it)
        except StopIteration:   # as TrainingRun.next_pair_ids: the next epoch's iterator
            it = iter(sampler)
            got = next(it)
        assert got == peeked, (seen, state)
        seen += 1
        if seen == sampler.steps_per_epoch() + 1:   # resume mid-epoch in a fresh sampler
            resumed = PairSampler(SHAPES, 2, dp_rank=1, dp_size=2, seed=3, small_buckets=mode)
            resumed.load_state_dict(sampler.state_dict())
            assert resumed.peek() == sampler.peek()
