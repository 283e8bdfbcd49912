"""The `qwen3gen` command: a thin shell over the Python API (generate, chat, serve, download, bench). torch and the
model are imported only once a command needs them, so that --help and --version answer at once."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from typing import TYPE_CHECKING

from . import __version__
from .choices import ENGINES, GGUF_ENGINES, QUANTIZATIONS, THROUGHPUT_ENGINES
from .errors import InvalidParameterError, Qwen3GenError

if TYPE_CHECKING:
    from .llm import LLM
    from .results import Generation, GenerationStats

def add_model_options(parser: argparse.ArgumentParser, default_model: str) -> None:
    parser.add_argument("--model", default=default_model, help=f"checkpoint folder, Hub repo id, .gguf file, or alias base/reasoning (default: {default_model})")
    parser.add_argument("--device", help="cuda, mps, xpu or cpu (default: the first available, in that order)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on GPUs and for quantized weights, else float32)")
    parser.add_argument("--compile", action="store_true", help="compile the model's blocks with torch.compile and, on a GPU, run each step as a CUDA graph (warm-up: tens of seconds)")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, help="weight-only quantization (int8: per-channel scales; int4: Q4_K blocks, CPU only)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N", help="split every layer over N GPUs from --device on (or N CPU processes); Hugging Face checkpoints (default: 1)")
    add_engine_options(parser)


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--kv-memory", help="KV cache pool size, bytes or e.g. 8GiB, 512MiB (default: most of the free GPU memory; on CPU 2 GiB or a quarter of the free memory)")
    group.add_argument("--max-running", type=int, help="most requests decoded together (default: 256 on GPU, 64 on CPU)")
    group.add_argument("--max-batched-tokens", type=int, help="token budget of one step, prefill chunks and decodes together (default: 8192 on GPU, 512 on CPU)")


def load_kwargs(args: argparse.Namespace) -> dict:
    """llm.load's options from the model flags (generate, chat and serve share them); unset engine options left out."""
    engine = {name: getattr(args, name) for name in ("kv_memory", "max_running", "max_batched_tokens")}
    options = dict(
        device=args.device, dtype=args.dtype, compile=args.compile, quantization=args.quantize,
        tensor_parallel_size=args.tensor_parallel_size,
    )  # fmt: skip
    return {**options, **{name: value for name, value in engine.items() if value is not None}}


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (defaults: the checkpoint's generation_config.json)")
    group.add_argument("--max-new-tokens", type=int, help="most tokens to generate")
    group.add_argument("--temperature", type=float, help="0 for greedy decoding")
    group.add_argument("--top-k", type=int, help="sample among the K most likely tokens only (0: off)")
    group.add_argument("--top-p", type=float, help="sample among the most likely tokens that make up probability P (1: off)")
    group.add_argument("--min-p", type=float, help="drop tokens less likely than P times the most likely one (0: off)")
    group.add_argument("--repetition-penalty", type=float, help="divide the logits of tokens already seen by R (1: off)")
    group.add_argument("--seed", type=int, help="same seed, same text")
    group.add_argument("--stop", action="append", help="stop when this text appears (repeatable); it is not printed")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    names = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop")
    return {name: getattr(args, name) for name in names}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen3gen", description="Text generation with Qwen3 models in pure PyTorch.")
    parser.add_argument("--version", action="version", version=f"qwen3gen {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="continue a prompt (default model: the base one)")
    generate.add_argument("prompt", nargs="?", help="the prompt text, or - to read it from standard input")
    generate.add_argument("--batch", metavar="FILE", help="generate for every line of FILE (- for standard input) as one batch")
    generate.add_argument("-n", type=int, default=1, help="samples per prompt, generated as one batch")
    generate.add_argument("--chat", action="store_true", help="send each prompt as a user turn through the checkpoint's chat template")
    generate.add_argument("--system", help="with --chat: a system prompt before it")
    add_model_options(generate, "base")
    add_sampling_options(generate)
    output = generate.add_mutually_exclusive_group()
    output.add_argument("--stream", action="store_true", help="print text as it is generated")
    output.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, finish_reason, stats")

    chat = commands.add_parser("chat", help="interactive multi-turn chat (default model: the reasoning one)")
    add_model_options(chat, "reasoning")
    add_sampling_options(chat)
    chat.add_argument("--no-think", action="store_true", help="answer directly, without a thinking block")
    chat.add_argument("--system", help="a system prompt")

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (default model: the reasoning one)")
    add_model_options(serve, "reasoning")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every API route (/health stays open)")
    serve.add_argument("--served-model-name", help="the name clients ask for (default: the --model value)")
    serve.add_argument("--max-queue", type=int, help="most requests waiting for the engine; more get 429 at once (default: no limit)")

    download = commands.add_parser("download", help="fetch a model into the Hugging Face cache, and nothing else")
    download.add_argument("model", help="Hub repo id or alias (base, reasoning)")

    bench = commands.add_parser("bench", help="decode speed of qwen3gen against transformers, in one run")
    bench.add_argument("--model", help="a checkpoint (default: random weights of --preset's shape, offline); a .gguf file: qwen3gen against llama.cpp on it")
    bench.add_argument("--preset", default="0.6B", help="model shape when no --model is given (default: 0.6B)")
    bench.add_argument("--device", help="cuda, mps, xpu or cpu (default: the first available)")
    bench.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on GPUs and for quantized weights, else float32)")
    bench.add_argument("--quantize", choices=QUANTIZATIONS, help="weight-only quantization of qwen3gen's model")
    bench.add_argument("--prompt-tokens", type=int, default=32, help="prompt length of every row (default: 32)")
    bench.add_argument("--new-tokens", type=int, default=256, help="tokens generated per row, EOS ignored (default: 256)")
    bench.add_argument("--batch", type=int, default=1, help="rows decoded together")
    bench.add_argument("--reps", type=int, default=3, help="timed repetitions (after one warm-up run)")
    bench.add_argument("--engines", help=f"comma-separated subset of {','.join(ENGINES)} (with --throughput: of {','.join(THROUGHPUT_ENGINES)}; with a .gguf --model: of {','.join(GGUF_ENGINES)})")
    bench.add_argument("--json", action="store_true", help="print the setup and rows as JSON")
    bench.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N", help="also run each qwen3gen row split over N ranks (GPUs from --device on, or CPU processes), after the same engine on one")
    bench.add_argument("--prefill-tokens", type=int, default=512, help="with a .gguf --model: the prefill prompt's length (default: 512)")
    workload = bench.add_argument_group("--throughput: the offline workload (defaults: 256 requests of 100-1,024 + 100-1,024 tokens on a GPU, 8 of 16-64 + 16-64 on a CPU)")
    workload.add_argument("--throughput", action="store_true", help="many requests of random lengths through the engine and transformers' continuous batching")
    workload.add_argument("--requests", type=int, help="how many requests")
    workload.add_argument("--concurrency", type=int, help="most requests running at once (default: the engine's max_running)")
    workload.add_argument("--min-prompt-tokens", type=int, help="shortest prompt")
    workload.add_argument("--max-prompt-tokens", type=int, help="longest prompt")
    workload.add_argument("--min-output-tokens", type=int, help="fewest tokens a request generates")
    workload.add_argument("--max-output-tokens", type=int, help="most tokens a request generates")
    workload.add_argument("--kv-memory", help="KV pool of every engine (default: room for all the requests at once)")
    workload.add_argument("--max-batched-tokens", type=int, help="token budget of one step")
    serve = bench.add_argument_group("--serve: the server under load over HTTP, against the offline engine")
    serve.add_argument("--serve", action="store_true", help="the throughput workload and a latency workload (concurrency 1, 16, 64 on a GPU) through `qwen3gen serve`")
    serve.add_argument("--tokenizer", help="with random weights: a folder with tokenizer.json and tokenizer_config.json")
    serve.add_argument("--compile", action="store_true", help="compile the engines' decode steps")
    return parser


def print_stats(stats: GenerationStats | None) -> None:
    if stats is not None:
        print(stats.summary(), file=sys.stderr, flush=True)


def generation_dict(out: Generation) -> dict:
    return {"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason, "stats": out.stats.to_dict()}


def read_prompts(args: argparse.Namespace) -> list[str]:
    """PROMPT, standard input (PROMPT -), or the non-empty lines of --batch FILE (- for standard input), as text."""
    source = args.batch or (args.prompt if args.prompt == "-" else None)
    if source is None:
        return [args.prompt]
    name = "standard input" if source == "-" else source
    try:
        text = (read_stdin() if source == "-" else Path(source).read_bytes()).decode("utf-8")
    except IsADirectoryError:
        raise InvalidParameterError(f"{name} is a directory, not a file of prompts.") from None
    except OSError as error:
        raise InvalidParameterError(f"cannot read {name}: {error.strerror or error}.") from None
    except UnicodeDecodeError as error:
        raise InvalidParameterError(f"{name} is not UTF-8 text (byte {error.start} is not valid UTF-8).") from None
    prompts = [line for line in text.splitlines() if line.strip()] if args.batch else [text]
    if not prompts:
        raise InvalidParameterError(f"{name} holds no prompt.")
    return prompts


def read_stdin() -> bytes:
    """Standard input's bytes (decoded here, so that bad UTF-8 gets one sentence), or a text stream's, re-encoded."""
    stream = getattr(sys.stdin, "buffer", None)
    return stream.read() if stream is not None else sys.stdin.read().encode("utf-8", "surrogateescape")


def prepared(llm: LLM, args: argparse.Namespace, prompt: str) -> str | list[int]:
    """The prompt as given, or with --chat as a user turn (after --system) through the checkpoint's chat template."""
    if not args.chat:
        return prompt
    system = [{"role": "system", "content": args.system}] if args.system else []
    return llm.tokenizer.apply_chat_template([*system, {"role": "user", "content": prompt}], add_generation_prompt=True)


def run_batch(llm: LLM, args: argparse.Namespace) -> None:
    """Every prompt (the lines of --batch FILE, or PROMPT) x n samples as one batch; JSON Lines with --json."""
    prompts = [prepared(llm, args, p) for p in read_prompts(args)]
    results = llm.generate(prompts, n=args.n, **sampling_kwargs(args))
    flat = [g for group in results for g in (group if args.n > 1 else [group])]
    for i, out in enumerate(flat):
        prompt_index, sample = divmod(i, args.n)
        print(json.dumps({"prompt": prompt_index, "sample": sample, **generation_dict(out)}, ensure_ascii=False) if args.json else f"--- prompt {prompt_index}, sample {sample} ({out.finish_reason})\n{out.text}")
    print_stats(flat[0].stats)


def check_generate_args(args: argparse.Namespace) -> None:
    """The usage errors that need no model, before it loads."""
    if args.prompt is None and not args.batch:
        raise InvalidParameterError("give a PROMPT, or --batch FILE.")
    if args.prompt is not None and args.batch:
        raise InvalidParameterError("give a PROMPT or --batch FILE, not both.")
    if args.n < 1:
        raise InvalidParameterError(f"-n must be >= 1, not {args.n}.")
    if args.system is not None and not args.chat:
        raise InvalidParameterError("--system goes with --chat.")
    if (args.batch or args.n > 1) and args.stream:
        raise InvalidParameterError("--stream shows one generation; use --json or plain output with --batch or -n.")


def run_generate(llm: LLM, args: argparse.Namespace) -> None:
    from .results import reset_peak_memory

    reset_peak_memory(llm.engine.device)  # the stats' peak is the generation's own, not the load's
    if args.batch or args.n > 1:
        run_batch(llm, args)
        return
    prompt = prepared(llm, args, read_prompts(args)[0])
    options = sampling_kwargs(args)
    if args.stream:
        stream = llm.stream(prompt, **options)
        for piece in stream:
            print(piece, end="", flush=True)
        print()
        print_stats(stream.result.stats)
        return
    out = llm.generate(prompt, **options)
    if args.json:
        print(json.dumps(generation_dict(out), ensure_ascii=False))
    else:
        print(out.text)
    print_stats(out.stats)


def run_chat(llm: LLM, args: argparse.Namespace) -> None:
    from .repl import ChatSession

    ChatSession(llm, args.system, not args.no_think, sampling_kwargs(args)).run()


def run_bench_command(args: argparse.Namespace) -> None:
    from .bench import (
        TABLE_HEAD, THROUGHPUT_TABLE_HEAD, format_row, format_setup, format_throughput_row, format_throughput_setup,
        parallel_ratios, run_bench, run_throughput, to_json,
    )

    counts = ("prompt_tokens", "new_tokens", "batch", "reps", "requests", "concurrency", "max_batched_tokens", "prefill_tokens")
    counts += ("tensor_parallel_size", "min_prompt_tokens", "max_prompt_tokens", "min_output_tokens", "max_output_tokens")
    for name in counts:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InvalidParameterError(f"--{name.replace('_', '-')} must be at least 1, not {value}.")
    gguf = bool(args.model) and args.model.endswith(".gguf") and not (args.throughput or args.serve)
    if args.tensor_parallel_size > 1 and (gguf or args.throughput or args.serve):
        raise InvalidParameterError("--tensor-parallel-size takes the decode rows (not --throughput, --serve or a .gguf file).")
    known = GGUF_ENGINES if gguf else THROUGHPUT_ENGINES if args.throughput else ENGINES
    engines = tuple(e.strip() for e in (args.engines or ",".join(known)).split(",") if e.strip())
    unknown = [e for e in engines if e not in known]
    if unknown:
        raise InvalidParameterError(f"unknown engine {unknown[0]!r} (choose from {', '.join(known)}).")
    shown: list[object] = []

    def printer(setup_line: Callable[[dict], str], head: str, line: Callable) -> Callable[[dict, object], None]:
        def show(setup: dict, row: object) -> None:
            """Print each row as soon as it is measured (the header before the first)."""
            if not shown:
                print(setup_line(setup), "", head, sep="\n")
            shown.append(row)
            print(line(row), flush=True)

        return show

    if gguf:
        from .gguf_bench import GGUF_TABLE_HEAD, format_gguf_row, format_gguf_setup, run_gguf_bench

        show = printer(format_gguf_setup, GGUF_TABLE_HEAD, format_gguf_row)
        setup, rows = run_gguf_bench(
            args.model, engines, args.prompt_tokens, args.new_tokens,
            args.prefill_tokens, args.reps, on_row=None if args.json else show,
        )  # fmt: skip
        if args.json:
            print(to_json(setup, rows))
        return
    if args.serve:
        from .serve_bench import SERVE_TABLE_HEAD, format_serve_row, format_serve_setup, run_serve_bench

        run_serve_bench(
            args.model, args.tokenizer, args.preset, args.device, args.dtype, args.requests, args.compile,
            on_row=printer(format_serve_setup, SERVE_TABLE_HEAD, format_serve_row),
        )  # fmt: skip
        return
    if args.throughput:
        show = printer(format_throughput_setup, THROUGHPUT_TABLE_HEAD, format_throughput_row)
        setup, rows = run_throughput(
            args.model, args.preset, args.device, args.dtype, args.requests, args.concurrency, args.max_batched_tokens,
            args.min_prompt_tokens, args.max_prompt_tokens, args.min_output_tokens, args.max_output_tokens,
            args.kv_memory, engines, on_row=None if args.json else show,
        )  # fmt: skip
        if args.json:
            print(to_json(setup, rows))
        return
    show = printer(format_setup, TABLE_HEAD, format_row)
    setup, rows = run_bench(
        args.model, args.preset, args.device, args.dtype, args.prompt_tokens, args.new_tokens, args.batch, args.reps,
        args.quantize, engines, on_row=None if args.json else show, tensor_parallel_size=args.tensor_parallel_size,
    )
    if args.json:
        print(to_json(setup, rows))
    else:
        print(*parallel_ratios(rows), sep="\n")


def check_serve_args(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise InvalidParameterError(f"--port must be in 0 to 65535, not {args.port}.")
    if args.max_queue is not None and args.max_queue < 0:
        raise InvalidParameterError(f"--max-queue must be >= 0, not {args.max_queue}.")


def run_serve(args: argparse.Namespace) -> None:
    """Serve until Ctrl-C or SIGTERM. The engine process loads the model (and records every step graph) before the
    server listens. uvicorn handles both signals: it stops accepting, the app aborts what is left and ends the engine
    process, then uvicorn raises the signal again, so that the process ends as that signal says."""
    import uvicorn

    from .llm import load
    from .server import EngineProcess, create_app

    name = args.served_model_name or args.model
    build = functools.partial(load, args.model, **load_kwargs(args))
    app = create_app(EngineProcess(build, max_queue=args.max_queue), name, api_key=args.api_key)
    app.router.add_event_handler("shutdown", lambda: print("qwen3gen: server stopped", file=sys.stderr, flush=True))
    print(f"qwen3gen: serving {name} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


@contextlib.contextmanager
def sigint_for_the_main_thread(active: bool) -> Iterator[None]:
    """Threads started inside (torch's and the C kernels' compute threads) never take a Ctrl-C: the terminal's
    SIGINT then always reaches the main thread, which waits in input() at the chat prompt. Taken by another thread,
    it would not wake that wait, and Ctrl-C at the prompt would be lost. A Ctrl-C during the block lands after it."""
    if not active or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "download":
            from .loaders import checkpoint

            print(checkpoint.download(args.model))
            return 0
        if args.command == "bench":
            run_bench_command(args)
            return 0
        if args.command == "serve":
            check_serve_args(args)
            run_serve(args)
            return 0
        if args.command == "generate":
            check_generate_args(args)
        from .sampling import SamplingParams

        SamplingParams(**{k: v for k, v in sampling_kwargs(args).items() if v is not None})
        from .llm import load

        with sigint_for_the_main_thread(args.command == "chat"):
            llm = load(args.model, **load_kwargs(args))
            if args.command == "chat":  # starts the compute threads now, while they inherit the blocked SIGINT
                llm.generate([0, 1], max_new_tokens=2, temperature=0.0, ignore_eos=True)
        if args.command == "generate":
            run_generate(llm, args)
        else:
            run_chat(llm, args)
    except Qwen3GenError as err:
        print(f"qwen3gen: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
