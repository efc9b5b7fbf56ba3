"""Negatives (losers) of the GT-Pairs: sampled by the base model, or imported from other generators."""
from .flow import SOLVERS, guided, sample, shifted_sigmas
from .generate import SamplerOptions, check_model_fits, debug_arch_for, generate_negatives, keyed_noise, negative_id
from .import_videos import decode_options_of, import_negatives

__all__ = ["SOLVERS", "SamplerOptions", "check_model_fits", "debug_arch_for", "decode_options_of", "generate_negatives",
           "guided", "import_negatives", "keyed_noise", "negative_id", "sample", "shifted_sigmas"]
