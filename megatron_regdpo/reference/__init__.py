"""Reference errors for DPO (objective.reference.mode): lora_base | resident | cpu_swap | cached."""
from .base import ReferenceBatch, ReferenceErrors, model_errors, unwrap
from .cache import (ReferenceCache, attr_mismatches, checkpoint_fingerprint, read_cache_attrs,
                    write_reference_cache)
from .modes import (MODES, CachedReference, CpuSwapReference, LoraBaseReference, ResidentReference, build_reference,
                    frozen_reference_model)
from .precompute import PairLatents, precompute_reference_errors, read_pair_bundle, reference_batch

__all__ = [
    "ReferenceBatch", "ReferenceErrors", "model_errors", "unwrap", "ReferenceCache", "write_reference_cache",
    "attr_mismatches", "checkpoint_fingerprint", "read_cache_attrs",
    "MODES", "CachedReference", "CpuSwapReference", "LoraBaseReference", "ResidentReference", "build_reference",
    "frozen_reference_model", "PairLatents", "precompute_reference_errors", "read_pair_bundle", "reference_batch",
]
