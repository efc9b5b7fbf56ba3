"""megatron_regdpo: Reg-DPO preference fine-tuning of Wan2.1 video DiTs on Megatron-Core."""

__version__ = "0.1.0"

# The floors of the house, lowest first (docs/architecture.md). A module may import its own package and any
# package on a lower floor; never one on a higher floor, nor another package on its own floor (models and
# objectives know nothing of each other). "kernels" is the top-level package beside this one; smoke, train,
# demo and launcher are this package's top-level modules. Plain data, checked without importing anything by
# tests/unit/test_layers.py.
LAYERS = (
    ("config", "checkpoint_io", "kernels"),   # pure python / torch only, imports nothing of ours
    ("parallel",),                            # process groups, CP, pipeline, DDP/FSDP2 wrapping
    ("models", "objectives"),                 # the model; the method (pure tensor math)
    ("data",),                                # decode/encode/store; negatives sample with the base model
    ("reference",),                           # DPO reference errors
    ("training",),                            # the one place that knows model, method and data
    ("capacity",),                            # the planner: simulates the trainer's step
    ("smoke",),                               # train.py's one-step model check
    ("train", "demo", "launcher"),            # entry points (launcher: torchrun's, quiet on a said error)
    ("experiments",),                         # benchmarks and experiments: imports anything, imported by nothing
)
