"""MemoryTracker counts live storages by category and phase, on real tensors and under fake tensors."""
from __future__ import annotations

import torch

from megatron_regdpo.capacity.fake_world import fake_tensor_mode
from megatron_regdpo.capacity.tracker import HOST, MemoryTracker


def test_categories_peak_and_release_on_real_tensors():
    tracker = MemoryTracker(granule=1)
    with tracker:
        with tracker.stage("build", "weights"):
            w = torch.empty(1000)                                    # 4,000 B
        with tracker.stage("forward", "activations"):
            x = torch.empty(2000)                                    # 8,000 B
            y = x * 2                                                # 8,000 B
            view = x[10:]                                            # same storage: not counted again
            del x, y, view
        with tracker.stage("update", "optimizer"):
            state = torch.zeros(500)                                 # 2,000 B
    assert tracker.current["weights"] == 4000 and tracker.current["activations"] == 0
    assert tracker.current["optimizer"] == 2000 and tracker.total == 6000
    assert tracker.peak == 20000 and tracker.peak_phase == "forward"
    assert tracker.peak_breakdown["activations"] == 16000 and tracker.peak_breakdown["weights"] == 4000
    assert tracker.phase_peaks == {"build": 4000, "forward": 20000, "update": 6000}
    del w, state


def test_granule_rounding_move_to_host_and_reset():
    tracker = MemoryTracker(granule=512)
    with tracker:
        a = torch.empty(1)                                           # 4 B -> one 512 B block
        b = torch.empty(300)                                         # 1,200 B -> 1,536 B
    assert tracker.total == 512 + 1536
    tracker.move(b, HOST)
    assert tracker.total == 512 and tracker.current[HOST] == 1536
    del b
    assert tracker.current[HOST] == 0
    tracker.reset_peak()
    assert tracker.peak == 512 and tracker.peak_overall == 2048
    del a


def test_fake_tensors_are_counted_without_memory_and_scalar_reads_answer():
    tracker = MemoryTracker(granule=1, fake=True)
    with fake_tensor_mode(), tracker:
        big = torch.empty(2**34, dtype=torch.bfloat16)              # 32 GiB, never allocated
        assert tracker.total == 2**35
        assert torch.ones(3).sum().item() == 1                       # no data: a fixed, finite answer
        assert torch.zeros(2).isnan().any().item() is False
        lin = torch.nn.Linear(8, 8).to(torch.bfloat16)               # module casts swap fake parameters
        assert lin.weight.dtype == torch.bfloat16
        del big
    assert tracker.peak >= 2**35


def test_storage_resizes_are_followed():
    """FSDP2 frees and re-allocates its unsharded parameters by resizing their storages to 0 and back."""
    tracker = MemoryTracker(granule=1)
    with tracker:
        with tracker.stage("reference", "reference"):
            buf = torch.empty(1000)                                  # 4,000 B
        buf.untyped_storage().resize_(0)                             # freed, the tensor lives on
        assert tracker.total == 0
        with tracker.stage("forward", "activations"):
            buf.untyped_storage().resize_(4000)                      # re-allocated by this phase
        assert tracker.current == {**tracker.current, "activations": 4000, "reference": 0}
        del buf
    assert tracker.total == 0 and tracker.peak == 4000
    assert torch.UntypedStorage.resize_ is torch._C.StorageBase.resize_   # restored on exit
