"""Hugging Face Qwen safetensors → GGUF → quantized GGUF, streamed and verified."""
