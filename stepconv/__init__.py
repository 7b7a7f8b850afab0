"""stepconv: Step-3.5-Flash between Hugging Face and Megatron-Core checkpoints."""

__version__ = "0.1.0"
