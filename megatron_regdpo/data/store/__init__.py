"""The zarr 3 GT-Pair store: latents, text embeddings, image conditioning, the pair index; resumable writes."""
from .arrays import read_array, write_array
from .check import StoreReport, check_store
from .commits import CommitLog
from .repair import RepairResult, repair_store
from .store import FORMAT, GTPairStore, PairEntry, prompt_id, safe_id

__all__ = ["FORMAT", "CommitLog", "GTPairStore", "PairEntry", "RepairResult", "StoreReport", "check_store",
           "prompt_id", "read_array", "repair_store", "safe_id", "write_array"]
