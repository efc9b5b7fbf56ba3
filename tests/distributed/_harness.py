"""The tests spawn worlds with the package's own launcher (megatron_regdpo.parallel.spawn)."""
from megatron_regdpo.parallel.spawn import run_world  # noqa: F401
