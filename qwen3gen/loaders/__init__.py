"""Loading weights: Hugging Face checkpoints (checkpoint.py), llama.cpp's GGUF files (gguf.py), and weight-only
quantization of what was loaded (quantize.py)."""
