"""`promptstash serve | generate | bench`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF directory or .gguf file (default: Qwen2.5-Coder-0.5B-Instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-tokens", type=int, default=32768, help="KV pool size in tokens")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn reuse off (for comparisons)")
    p.add_argument("--cache-dir", default=None, help="where converted models live (default ~/.cache/promptstash)")


def _engine(args: argparse.Namespace):
    from promptstash.engine.engine import Engine

    return Engine.from_pretrained(args.model, dtype=args.dtype, device=args.device, block_size=args.block_size,
                                  kv_cache_tokens=args.kv_cache_tokens, cache_dir=args.cache_dir,
                                  enable_prefix_caching=not args.no_prefix_caching)


def _print_stream(engine, prompt, max_tokens: int, temperature: float):
    def show(update) -> None:
        print(update.new_text, end="", flush=True)

    out = engine.generate(prompt, max_tokens=max_tokens, temperature=temperature, on_update=show)
    print()
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    engine = _engine(args)
    prompt = [{"role": "user", "content": args.prompt}] if not args.raw else args.prompt
    out = _print_stream(engine, prompt, args.max_tokens, args.temperature)
    print(f"[{out.usage.prompt_tokens} prompt tokens, {out.usage.cached_tokens} cached, "
          f"{out.usage.completion_tokens} generated; TTFT {out.timings.ttft_s:.3f}s; finish: {out.finish_reason}]",
          file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Until the HTTP server lands: an interactive chat whose whole history is reused turn after turn."""
    engine = _engine(args)
    print("promptstash: interactive chat on the default model (the HTTP server comes with the server issue).\n"
          "Each turn resends the whole conversation; watch the cached-token count. Ctrl-D quits.", file=sys.stderr)
    messages = [{"role": "system", "content": args.system}]
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        out = _print_stream(engine, messages, args.max_tokens, args.temperature)
        messages.append({"role": "assistant", "content": out.text})
        print(f"[{out.usage.prompt_tokens} prompt tokens, {out.usage.cached_tokens} reused from the cache; "
              f"TTFT {out.timings.ttft_s:.3f}s]", file=sys.stderr)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.workload != "prefix":
        print(f"unknown workload {args.workload!r}; available: prefix", file=sys.stderr)
        return 2
    from promptstash.bench import prefix

    start = time.perf_counter()
    res = prefix.run(prefix_lens=args.prefix_lens, throughput_lens=args.throughput_lens, dtypes=args.dtypes,
                     model=args.model, baseline=not args.no_baseline)
    js, md = prefix.write(res, Path(args.out))
    print(prefix.to_markdown(res))
    print(f"wrote {js} and {md} in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="promptstash", description="LLM inference with exact prompt caching")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a reply to one prompt")
    g.add_argument("prompt")
    g.add_argument("--raw", action="store_true", help="send the prompt as raw text, without the chat template")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    _engine_args(g)
    s = sub.add_parser("serve", help="serve the model (for now: an interactive chat demo)")
    s.add_argument("--system", default="You are a helpful assistant.")
    s.add_argument("--max-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    _engine_args(s)
    b = sub.add_parser("bench", help="run a benchmark workload")
    b.add_argument("workload", help="prefix")
    b.add_argument("--model", default=None)
    b.add_argument("--out", default="benchmarks/results")
    b.add_argument("--prefix-lens", type=int, nargs="+", default=[512, 2048, 8192])
    b.add_argument("--throughput-lens", type=int, nargs="+", default=[512, 2048])
    b.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    b.add_argument("--no-baseline", action="store_true", help="skip transformers' implementation")
    args = parser.parse_args(argv)
    from promptstash.errors import PromptstashError

    try:
        return {"generate": cmd_generate, "serve": cmd_serve, "bench": cmd_bench}[args.command](args)
    except PromptstashError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
