"""Negatives (losers) of the GT-Pairs: sampled by the base model, or imported from other generators."""
from .flow import guided, sample
from .generate import (SamplerOptions, check_model_fits, debug_arch_for, generate_negatives, guided_velocity,
                       keyed_noise, negative_id)
from .import_videos import decode_options_of, import_negatives
from .schedules import KINDS as SOLVERS
from .schedules import FlowScheduler, Schedule, shifted_sigmas

__all__ = ["SOLVERS", "FlowScheduler", "SamplerOptions", "Schedule", "check_model_fits", "debug_arch_for",
           "decode_options_of", "generate_negatives", "guided", "guided_velocity", "import_negatives", "keyed_noise",
           "negative_id", "sample", "shifted_sigmas"]
