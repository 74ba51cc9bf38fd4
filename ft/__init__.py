"""ft: a raw-PyTorch FSDP fine-tuning loop for the Qwen VL models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)."""

__version__ = "0.1.0"
