"""Decode and prefill speed, load time and peak RSS of one engine on one GGUF file, in a process of its own (so that
the RSS is that engine's), until `qwen3gen bench --model FILE.gguf` has a llama.cpp row:

    python scripts/gguf_decode.py qwen3gen /tmp/gg/q4km.gguf        # QWEN3GEN_CPU_ISA=avx2 etc. picks the kernels
    python scripts/gguf_decode.py llama.cpp /tmp/gg/q4km.gguf      # llama-cpp-python, 2 threads, n_batch 1

Greedy, a 32-token random prompt, 128 new tokens (EOS ignored), three runs; then one 512-token prefill.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engine", choices=["qwen3gen", "llama.cpp"])
    parser.add_argument("file")
    parser.add_argument("--n-batch", type=int, default=1, help="llama.cpp's batch (its batched path crashed here)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    prompt, long_prompt = rng.integers(1000, 100000, 32).tolist(), rng.integers(1000, 100000, 512).tolist()
    start = time.perf_counter()
    if args.engine == "qwen3gen":
        import qwen3gen

        llm = qwen3gen.load(args.file, device="cpu", dtype="bfloat16")
        greedy = lambda ids, n: llm.generate(  # noqa: E731
            ids, params=qwen3gen.SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)
        ).token_ids
    else:
        import llama_cpp

        llm = llama_cpp.Llama(
            model_path=args.file, n_threads=2, n_threads_batch=2, n_ctx=1024, n_batch=args.n_batch, verbose=False
        )

        def greedy(ids: list[int], n: int) -> list[int]:
            llm.reset()
            llm.eval(ids)
            out = []
            for _ in range(n):
                out.append(int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)))))
                llm.eval(out[-1:])
            return out

    load = time.perf_counter() - start
    for _ in range(3):
        begin = time.perf_counter()
        greedy(prompt, 1)
        first = time.perf_counter()
        tokens = greedy(prompt, 129)
        decode = 128 / (time.perf_counter() - first - (first - begin))  # less the prefill and first token
        print(f"decode {decode:.1f} tok/s, tokens {tokens[:8]}")
    begin = time.perf_counter()
    greedy(long_prompt, 1)
    print(f"prefill-512 {512 / (time.perf_counter() - begin):.0f} tok/s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"load {load:.2f} s (imports included), peak RSS {peak:.2f} GB")


if __name__ == "__main__":
    main()
