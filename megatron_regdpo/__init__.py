"""megatron_regdpo: Reg-DPO preference fine-tuning of Wan2.1 video DiTs on Megatron-Core."""

__version__ = "0.1.0"
