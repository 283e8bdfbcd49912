"""The names the CLI offers (quantizations, bench engines), in a module that imports nothing, so that `qwen3gen
--help` is answered before torch is imported."""

QUANTIZATIONS = ("int8", "int4")
ENGINES = ("transformers", "qwen3gen", "qwen3gen-compiled", "transformers-static")
THROUGHPUT_ENGINES = ("transformers", "qwen3gen", "qwen3gen-compiled")
GGUF_ENGINES = ("llama.cpp", "qwen3gen")  # bench --model FILE.gguf: llama.cpp first, the ratios' baseline
