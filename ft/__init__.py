"""ft: a raw-PyTorch FSDP fine-tuning loop for Qwen2.5-VL."""

__version__ = "0.1.0"
