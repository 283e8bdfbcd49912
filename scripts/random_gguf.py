"""Write a GGUF file of random weights in a preset's shape with the real tokenizer, then (optionally) quantize it
with llama.cpp's own quantizer, for `qwen3gen bench --model FILE.gguf` against llama.cpp on the same file.

    python scripts/random_gguf.py --tokenizer ../shared/qwen3-tokenizer --out /tmp/q.gguf --type Q4_K_M

No real GGUF file can be downloaded here; llama.cpp's quantizer (through llama-cpp-python) makes the mix of formats
a real Q4_K_M file has (Q4_K, Q6_K for attn_v, half of ffn_down and the output, F32 norms), from an F16 file that the
gguf package writes. Random weights decode at the speed real ones do.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import torch

from qwen3gen.bench import random_model
from qwen3gen.config import PRESETS
from qwen3gen.loaders.gguf import gguf_name, write_tokenizer

LLAMA_FTYPES = {"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7, "Q4_0": 2}  # llama.cpp's enum llama_ftype


def write_f16(path: Path, preset: str, tokenizer: Path) -> None:
    model = random_model(PRESETS[preset], torch.device("cpu"), torch.float32)
    cfg = model.config
    writer = gguf.GGUFWriter(path, "qwen3")
    writer.add_name(f"random-{preset}")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    write_tokenizer(writer, tokenizer, cfg.vocab_size)
    for name, tensor in model.checkpoint_tensors():
        data = tensor.detach().numpy()
        writer.add_tensor(gguf_name(name), data if data.ndim == 1 else data.astype("float16"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="0.6B", choices=sorted(PRESETS))
    parser.add_argument("--tokenizer", type=Path, required=True, help="a folder with tokenizer.json and tokenizer_config.json")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--type", default="F16", choices=["F16", *LLAMA_FTYPES], help="F16, or a llama.cpp file type")
    args = parser.parse_args()
    f16 = args.out if args.type == "F16" else args.out.with_suffix(".f16.gguf")
    write_f16(f16, args.preset, args.tokenizer)
    if args.type != "F16":
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = LLAMA_FTYPES[args.type], 2
        status = llama_cpp.llama_model_quantize(str(f16).encode(), str(args.out).encode(), params)
        if status != 0:
            raise SystemExit(f"llama.cpp's quantizer failed ({status})")
        f16.unlink()
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
