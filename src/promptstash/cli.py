"""`promptstash serve | generate | route | bench`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF directory or .gguf file (default: Qwen2.5-Coder-0.5B-Instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="activations and KV (auto: bfloat16 where the CPU has bf16 instructions, else float32)")
    p.add_argument("--weights", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8", "int4"],
                   help="weight format (auto: the fastest decode among int4, int8 and the dtype, measured at start; "
                        "with an explicit --dtype, that dtype)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="int8/int4: keep every batch on the quantized kernels, so a request's result does not "
                        "depend on its batch (bit-identical); prefill is slower")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-tokens", type=int, default=32768, help="KV pool size in tokens")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn reuse off (for comparisons)")
    p.add_argument("--module-repair", default="none",
                   help="modules: what is recomputed where cached modules are assembled, unless a request says: "
                        "none (the default) | legolink[:K] (K=16) | cacheblend[:R] (R=0.3) | full")
    p.add_argument("--models-dir", default=None, help="where converted models live (default ~/.cache/promptstash)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, one per core); give each replica its share")
    p.add_argument("--eviction", default="lru", choices=["lru", "tlru", "cost"],
                   help="which cached block goes first when the pool is full: lru, tlru (tail-optimized: blocks a "
                        "conversation's next turn can recompute within --ttft-slo-ms go first) or cost (recompute "
                        "cost x uses); see `bench policies`")
    p.add_argument("--ttft-slo-ms", type=float, default=1000.0, help="tlru: the time-to-first-token target")
    p.add_argument("--schedule", default="fcfs", choices=["fcfs", "lpm"],
                   help="admission order: fcfs, or lpm (longest cached prefix first, bounded by --max-wait-ms)")
    p.add_argument("--max-wait-ms", type=float, default=10000.0,
                   help="lpm: a request waiting this long goes ahead of every other")


def _engine(args: argparse.Namespace):
    from promptstash.engine.engine import Engine

    tiers = {}
    if getattr(args, "command", None) == "serve":
        tiers = dict(kv_disk_dir=None if args.no_disk_cache else args.cache_dir,
                     kv_disk_bytes=_size(args.disk_cache_size), redis_url=args.redis_url,
                     kv_storage_dtype=args.kv_storage_dtype)
        if args.tenant_max_running is not None:
            tiers["tenant_max_running"] = args.tenant_max_running
    return Engine.from_pretrained(args.model, dtype=args.dtype, weights=args.weights,
                                  batch_invariant=args.batch_invariant, device=args.device, block_size=args.block_size,
                                  kv_cache_tokens=args.kv_cache_tokens, cache_dir=args.models_dir, **tiers,
                                  enable_prefix_caching=not args.no_prefix_caching, module_repair=args.module_repair,
                                  max_num_seqs=getattr(args, "max_num_seqs", 16), eviction=args.eviction,
                                  ttft_slo_ms=args.ttft_slo_ms, schedule=args.schedule, max_wait_ms=args.max_wait_ms,
                                  num_threads=args.threads)


def _size(text: str) -> int:
    """Bytes from '8GiB', '500MB', '1048576'."""
    units = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
             "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
    num = text.strip().lower().rstrip("s")
    i = len(num)
    while i and not num[i - 1].isdigit():
        i -= 1
    unit = num[i:].strip()
    if unit not in units or not num[:i]:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}; use e.g. 8GiB, 500MB or a byte count")
    return int(float(num[:i]) * units[unit])


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


def _api_keys(args: argparse.Namespace) -> dict[str, str]:
    """KEY or KEY:TENANT from --api-key, and one such entry per line of --api-keys-file ('#' comments).
    Checked by promptstash.server.state.parse_api_keys (a key listed twice, reserved tenant names...)."""
    from promptstash.server.state import APIKeyConfigError, parse_api_keys

    entries = list(args.api_key or [])
    sources = [f"--api-key #{i + 1}" for i in range(len(entries))]
    if args.api_keys_file:
        try:
            lines = Path(args.api_keys_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise APIKeyConfigError(f"cannot read --api-keys-file {args.api_keys_file}: {exc}") from None
        for number, line in enumerate(lines, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                entries.append(line.strip())
                sources.append(f"{args.api_keys_file} line {number}")
    return parse_api_keys(entries, sources)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from promptstash.config import PriceSheet, ServerConfig
    from promptstash.server.app import create_app

    config = ServerConfig(
        host=args.host, port=args.port, served_model_name=args.served_model_name, api_keys=_api_keys(args),
        admin_keys=tuple(args.admin_key or ()), metrics_key=args.metrics_key, metrics_port=args.metrics_port,
        min_cacheable_tokens=args.min_cacheable_tokens, max_queued_requests=args.max_queued_requests,
        tenant_max_queued=args.tenant_max_queued, stream_idle_timeout_s=args.stream_idle_timeout,
        prices=PriceSheet(input_per_mtok=args.price_input, output_per_mtok=args.price_output),
        cors_allow_origins=tuple(o.strip() for entry in args.cors_allow_origin or () for o in entry.split(",")
                                 if o.strip()),
        semantic_cache_tenants=tuple(args.semantic_cache_tenant or ()),
        kv_events_url=args.kv_events_url or (args.redis_url if args.kv_events else None), replica_id=args.replica_id,
    )
    if args.kv_events and not config.kv_events_url:
        print("promptstash: --kv-events needs --redis-url or --kv-events-url", file=sys.stderr)
        return 2
    if config.kv_events_url and "cluster" in config.kv_events_url.partition("://")[0]:
        print("promptstash: KV events need a plain Redis (redis://...); give one with --kv-events-url",
              file=sys.stderr)
        return 2
    print(f"promptstash: loading {args.model or 'the default model (Qwen2.5-Coder-0.5B-Instruct)'} ...",
          file=sys.stderr, flush=True)
    engine = _engine(args)
    app = create_app(engine, config)
    auth = (f"{len(config.api_keys or {})} API keys, {len(config.admin_keys)} admin keys"
            if config.api_keys or config.admin_keys else "no auth (one local tenant)")
    metrics = "/metrics" + (f", and http://{args.host}:{args.metrics_port}/metrics" if args.metrics_port else "")
    pool_tokens = engine.stats().cache.usage.num_blocks * engine.config.block_size
    ready = (f"promptstash: serving {app.state.promptstash.model_name} "
             f"({engine.model.weight_format} weights, {str(engine.model.dtype).removeprefix('torch.')} activations, "
             f"{pool_tokens:,}-token KV pool, {auth}) "
             f"at http://{args.host}:{args.port}/v1  (Anthropic: /v1/messages, metrics: {metrics})")

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                print(ready, file=sys.stderr, flush=True)

    Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)).run()
    return 0


def _bench_workload(args: argparse.Namespace) -> int:
    """rag | chat | system-prompt | trace: caching on vs off, in-process (default model) or against --url."""
    from promptstash.bench import report, workloads

    start = time.perf_counter()
    engine = None
    if args.url is None:
        from promptstash.engine.engine import Engine

        engine = Engine.from_pretrained(args.model, dtype=args.dtype)
    res = workloads.run(args.workload, engine=engine, url=args.url, model=args.model if args.url else None,
                        num_requests=args.requests, concurrency=args.concurrency, max_tokens=args.max_tokens,
                        k=args.k, scale=args.scale, vocab_size=args.vocab_size, api_key=args.api_key,
                        modules=args.modules, module_repair=args.module_repair,
                        log=lambda m: print(m, file=sys.stderr))
    paths = report.write(res, Path(args.out), log=lambda m: print(m, file=sys.stderr))
    print(report.to_markdown(res))
    print(f"wrote {', '.join(map(str, paths))} in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.workload == "summary":
        from promptstash.bench import summary

        path = summary.write(Path(args.out))
        print(path.read_text())
        return 0
    if args.workload in ("rag", "chat", "system-prompt", "trace"):
        return _bench_workload(args)
    if args.workload == "cluster":
        from promptstash.bench import cluster as bench_cluster

        return bench_cluster.main_cli(args)
    if args.workload == "modules":
        from promptstash.bench import modules as bench_modules

        start = time.perf_counter()
        res = bench_modules.run(args, log=lambda m: print(m, file=sys.stderr))
        js, md = bench_modules.write(res, Path(args.out))
        print(bench_modules.to_markdown(res))
        print(f"wrote {js} and {md} in {time.perf_counter() - start:.0f}s", file=sys.stderr)
        return 0
    if args.workload == "grammar":
        from promptstash.bench import grammar as bench_grammar

        start = time.perf_counter()
        res = bench_grammar.run(model=args.model, log=lambda m: print(m, file=sys.stderr))
        js, md = bench_grammar.write(res, Path(args.out))
        print(bench_grammar.to_markdown(res))
        print(f"wrote {js} and {md} in {time.perf_counter() - start:.0f}s", file=sys.stderr)
        return 0
    if args.workload == "agent":
        from promptstash.bench import agent as bench_agent

        start = time.perf_counter()
        res = bench_agent.run(agents=args.agents, steps=args.steps, max_tokens=args.agent_max_tokens, model=args.model,
                              dtype="float32" if args.dtype == "auto" else args.dtype,
                              log=lambda m: print(m, file=sys.stderr))
        js, md = bench_agent.write(res, Path(args.out))
        print(bench_agent.to_markdown(res))
        print(f"wrote {js} and {md} in {time.perf_counter() - start:.0f}s", file=sys.stderr)
        return 0
    if args.workload == "policies":
        from promptstash.bench import policies as bench_policies

        start = time.perf_counter()
        slo = None if args.ttft_slo_ms is None else args.ttft_slo_ms / 1000.0
        res = bench_policies.run(workloads=args.traces, fractions=args.pool_fractions, cost_model=args.cost_model,
                                 model=args.model, validate_model=not args.no_validate, ttft_slo_s=slo,
                                 load=args.load, quick=args.quick, log=lambda m: print(m, file=sys.stderr, flush=True))
        js, md = bench_policies.write(res, Path(args.out), log=lambda m: print(m, file=sys.stderr))
        print(bench_policies.to_markdown(res))
        print(f"wrote {js} and {md} in {time.perf_counter() - start:.0f}s", file=sys.stderr)
        return 0
    if args.workload == "semantic":
        from promptstash.bench import semantic as bench_semantic

        start = time.perf_counter()
        res = bench_semantic.run(log=lambda m: print(m, file=sys.stderr))
        js, md = bench_semantic.write(res, Path(args.out), log=lambda m: print(m, file=sys.stderr))
        print(bench_semantic.to_markdown(res))
        print(f"wrote {js} and {md} in {time.perf_counter() - start:.0f}s", file=sys.stderr)
        return 0
    if args.workload in ("peers", "perplexity"):
        from promptstash.bench import peers as bench_peers
        from promptstash.bench import perplexity as bench_perplexity

        start = time.perf_counter()
        log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        if args.workload == "perplexity":
            module = bench_perplexity
            res = bench_perplexity.run(window_len=args.window_len, windows=args.windows, model=args.model, log=log)
        else:
            module = bench_peers
            res = bench_peers.run(formats=args.formats, lengths=args.lengths, hit_lengths=args.hit_lengths,
                                  decode_tokens=args.decode_tokens, repeats=args.repeats, server=not args.no_server,
                                  quick=args.quick, users=args.users, model=args.model, log=log)
        js, md = module.write(res, Path(args.out))
        print(module.to_markdown(res))
        print(f"wrote {js} and {md} in {time.perf_counter() - start:.0f}s", file=sys.stderr)
        return 0
    if args.workload == "soak":
        from promptstash.bench import soak

        start = time.perf_counter()
        res = soak.run(duration=args.duration, clients=args.clients, disconnect_fraction=args.disconnect_fraction,
                       model=args.model, tiny=args.tiny, seed=args.seed,
                       dtype="float32" if args.dtype == "auto" else args.dtype, log=lambda m: print(m, file=sys.stderr))
        js, md = soak.write(res, Path(args.out))
        print(soak.to_markdown(res))
        print(f"wrote {js} and {md} in {time.perf_counter() - start:.0f}s", file=sys.stderr)
        return 0 if res["passed"] else 1
    from promptstash.bench import prefix, tenants, tiers

    start = time.perf_counter()
    if args.workload == "tenants":
        module = tenants
        res = tenants.run(model=args.model, trials=args.trials)
    elif args.workload == "tiers":
        module = tiers
        res = tiers.run(prefix_lens=args.tier_prefix_lens, model=args.model, redis_url=args.redis_url,
                        storage_dtype=args.kv_storage_dtype, use_redis=not args.no_redis)
    elif args.workload == "prefix":
        module = prefix
        res = prefix.run(prefix_lens=args.prefix_lens, throughput_lens=args.throughput_lens, dtypes=args.dtypes,
                         model=args.model, baseline=not args.no_baseline)
    else:
        print(f"unknown workload {args.workload!r}; available: prefix, tiers, rag, chat, system-prompt, trace, "
              "modules, grammar, agent, soak, tenants, peers, perplexity, policies, semantic, cluster, summary",
              file=sys.stderr)
        return 2
    js, md = module.write(res, Path(args.out))
    print(module.to_markdown(res))
    print(f"wrote {js} and {md} in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    """N replicas + HAProxy + Redis on this machine, until Ctrl-C (promptstash.deploy.local)."""
    import signal

    from promptstash.deploy.local import LocalDeployment

    def say(message: str) -> None:
        print(f"promptstash route: {message}", file=sys.stderr, flush=True)

    serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    work = Path(args.work_dir or Path("~/.cache/promptstash/route").expanduser())
    deployment = LocalDeployment(args.replicas, work_dir=work, port=args.port, redis_url=args.redis,
                                 affinity=not args.round_robin, kv_events=args.kv_events,
                                 serve_args=serve_args, threads=args.threads, stats_port=args.stats_port,
                                 log=say)
    say(f"starting {args.replicas} replicas (logs in {work}) ...")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with deployment:
        say(f"serving at {deployment.url}/v1 (HAProxy status page: http://127.0.0.1:{deployment.stats_port}/); "
            "Ctrl-C stops everything")
        try:
            while all(r.alive for r in deployment.replicas):
                time.sleep(1)
            dead = [r.name for r in deployment.replicas if not r.alive]
            say(f"{', '.join(dead)} exited (see its log); stopping")
            return 1
        except KeyboardInterrupt:
            say("stopping")
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
    s = sub.add_parser("serve", help="serve the model over OpenAI- and Anthropic-compatible HTTP APIs")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", default=None, help="model name in /v1/models (default: from the model)")
    s.add_argument("--api-key", action="append", metavar="KEY[:TENANT]",
                   help="accept this API key (repeatable); tenants never share cache. No keys: no auth")
    s.add_argument("--api-keys-file", default=None, help="file with one KEY[:TENANT] per line ('#' comments)")
    s.add_argument("--admin-key", action="append", metavar="KEY",
                   help="sees every tenant's figures, the pool and the tiers (repeatable); tenant 'admin' on routes")
    s.add_argument("--metrics-key", default=None, metavar="KEY", help="key for /metrics alone (Prometheus scraping)")
    s.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="also serve /metrics alone, every figure and no key, on this port of --host (trusted networks)")
    s.add_argument("--min-cacheable-tokens", type=int, default=1024,
                   help="cache_control breakpoints on shorter prefixes write nothing")
    s.add_argument("--max-queued-requests", type=int, default=256, help="beyond this, 429 (OpenAI) / 529")
    s.add_argument("--tenant-max-queued", type=int, default=0, metavar="N",
                   help="unfinished requests per tenant beyond this get 429 / 529 (0 = no per-tenant limit)")
    s.add_argument("--tenant-max-running", type=int, default=None, metavar="N",
                   help="requests of one tenant computed at once (default: the engine's)")
    s.add_argument("--stream-idle-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="abort a stream whose client has read nothing for this long (0 = never)")
    s.add_argument("--max-num-seqs", type=int, default=16, help="requests computed together")
    s.add_argument("--price-input", type=float, default=3.0, help="$ per million input tokens (cost estimates)")
    s.add_argument("--price-output", type=float, default=15.0, help="$ per million output tokens")
    s.add_argument("--cors-allow-origin", action="append", metavar="ORIGIN",
                   help="let web pages from this origin call the API (repeatable or comma-separated; '*' = any, "
                        "e.g. http://localhost:3000); default: no CORS")
    s.add_argument("--semantic-cache-tenant", action="append", metavar="TENANT",
                   help="turn the semantic cache on by default for this tenant's chat requests (repeatable; '*' = "
                        "every tenant; 'local' = the tenant when no keys are set): a paraphrase of an earlier last "
                        "user message in the same context gets the earlier answer without running the model. A "
                        "request may still send \"semantic_cache\": false; without this option a request opts "
                        "in with \"semantic_cache\": true | {\"threshold\": 0.9}. Sampled requests "
                        "(temperature > 0) without a seed never use it")
    s.add_argument("--log-level", default="warning")
    s.add_argument("--cache-dir", default=str(Path("~/.cache/promptstash/kv").expanduser()),
                   help="disk tier: KV blocks kept beyond memory and across restarts")
    s.add_argument("--disk-cache-size", default="8GiB", help="disk tier size cap (LRU beyond), e.g. 8GiB")
    s.add_argument("--no-disk-cache", action="store_true", help="turn the disk tier off")
    s.add_argument("--redis-url", default=None,
                   help="Redis tier, shared between servers: redis://HOST:PORT/DB, or a Redis Cluster: "
                        "redis+cluster://HOST:PORT[,HOST:PORT...] (rediss+cluster:// for TLS; the server does not "
                        "start if the cluster is unreachable or not all slots are assigned)")
    s.add_argument("--kv-events", action="store_true",
                   help="publish KV events (block hashes stored in / removed from the pool) to the Redis Stream "
                        "promptstash:kv-events of --redis-url, for external routers (README: KV events)")
    s.add_argument("--kv-events-url", default=None, metavar="URL",
                   help="publish KV events to this Redis (redis://HOST:PORT/DB) instead; implies --kv-events")
    s.add_argument("--replica-id", default=None, metavar="ID",
                   help="this server's name in KV events and /v1/cache/blocks/summary (default: hostname:port)")
    s.add_argument("--kv-storage-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of stored KV entries (auto = the pool's, exact; bfloat16 halves fp32 bytes)")
    _engine_args(s)
    b = sub.add_parser("bench", help="run a benchmark workload")
    r = sub.add_parser("route", help="try several replicas on this machine: N `serve` processes behind HAProxy "
                                     "(cache-affinity routing) sharing KV through Redis; Ctrl-C stops them")
    r.add_argument("--replicas", type=int, default=3)
    r.add_argument("--port", type=int, default=8000, help="HAProxy's port; replicas take the next ones")
    r.add_argument("--redis", default="cluster",
                   help="the shared KV tier: cluster (a local 3-master Redis Cluster), single (one redis-server), "
                        "none, or the URL of a running Redis (redis:// or redis+cluster://)")
    r.add_argument("--round-robin", action="store_true", help="route round robin instead of by affinity")
    r.add_argument("--kv-events", action="store_true", help="replicas publish KV events (README \"KV events\")")
    r.add_argument("--threads", type=int, default=None, help="torch threads per replica (default: cores / N)")
    r.add_argument("--stats-port", type=int, default=None, help="HAProxy's status page (default: a free port)")
    r.add_argument("--work-dir", default=None, help="configs and logs (default ~/.cache/promptstash/route)")
    r.add_argument("serve_args", nargs=argparse.REMAINDER,
                   help="after --: options for every replica's `promptstash serve`, e.g. -- --model DIR")
    b.add_argument("workload", help="prefix | tiers | modules | rag | chat | system-prompt | trace | grammar | agent "
                   "| soak | peers | perplexity | policies | semantic | cluster | summary")
    b.add_argument("--model", default=None)
    b.add_argument("--out", default="benchmarks/results")
    b.add_argument("--prefix-lens", type=int, nargs="+", default=[512, 2048, 8192])
    b.add_argument("--throughput-lens", type=int, nargs="+", default=[512, 2048])
    b.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    b.add_argument("--dtype", default="auto", help="workloads (in-process) and soak (default float32): model dtype")
    b.add_argument("--url", default=None, help="workloads: an OpenAI-compatible server (default: in-process)")
    b.add_argument("--api-key", default=None, help="workloads: API key for --url")
    b.add_argument("--requests", type=int, default=20, help="workloads: number of requests")
    b.add_argument("--concurrency", type=int, default=4, help="workloads: requests in flight")
    b.add_argument("--max-tokens", type=int, default=16, help="workloads: output tokens per request")
    b.add_argument("--k", type=int, default=3, help="rag: passages per question")
    b.add_argument("--scale", type=int, default=32, help="trace: divide the 512-token blocks and lengths by this")
    b.add_argument("--vocab-size", type=int, default=None, help="trace with --url: token ids below this")
    b.add_argument("--no-baseline", action="store_true", help="skip transformers' implementation")
    b.add_argument("--tier-prefix-lens", type=int, nargs="+", default=[2048, 8192], help="tiers: prefix lengths")
    b.add_argument("--redis-url", default=None, help="tiers: an existing Redis (default: start a local one)")
    b.add_argument("--kv-storage-dtype", default="auto", help="tiers: dtype of stored entries")
    b.add_argument("--no-redis", action="store_true", help="tiers: skip the Redis tier")
    b.add_argument("--trials", type=int, default=5, help="tenants: documents probed")
    b.add_argument("--duration", type=float, default=600.0, help="soak: seconds of load")
    b.add_argument("--clients", type=int, default=48, help="soak: concurrent streaming clients")
    b.add_argument("--disconnect-fraction", type=float, default=0.2, help="soak: streams closed mid-stream")
    b.add_argument("--tiny", action="store_true",
                   help="soak, cluster: a tiny random-weight model with the default tokenizer (a quick run)")
    b.add_argument("--seed", type=int, default=0, help="soak: seed of the request mix")
    b.add_argument("--questions", type=int, default=None, help="modules: questions per workload")
    b.add_argument("--agents", type=int, default=4, help="agent: agents running at once")
    b.add_argument("--steps", type=int, default=4, help="agent: tool-calling steps per agent")
    b.add_argument("--agent-max-tokens", type=int, default=64, help="agent: output tokens per step (one call)")
    b.add_argument("--modules", action="store_true",
                   help="rag: mark each passage as a module (writes workload-rag-modules.*)")
    b.add_argument("--module-repair", default=None, help="rag --modules: the requests' module_repair "
                   "(default: the engine's)")
    b.add_argument("--strategies", nargs="+", default=None,
                   help="modules: repair strategies to compare (default: prefix none legolink:16 legolink:32 "
                        "cacheblend:0.1 cacheblend:0.15 cacheblend:0.3 full)")
    b.add_argument("--formats", nargs="+", default=None,
                   help="peers: promptstash weight formats to measure (default: auto int8 float32)")
    b.add_argument("--repeats", type=int, default=None, help="peers: repeats per figure, median (default 3)")
    b.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="peers: cold prefill prompt lengths (default: 512 2048 8192)")
    b.add_argument("--hit-lengths", type=int, nargs="+", default=None,
                   help="peers: cached prefix lengths of the hit TTFT (default: 2048 8192)")
    b.add_argument("--decode-tokens", type=int, default=None, help="peers: tokens decoded (default 128)")
    b.add_argument("--users", type=int, default=None, help="peers: users of the server workload (default 8)")
    b.add_argument("--no-server", action="store_true", help="peers: skip the server workload")
    b.add_argument("--quick", action="store_true",
                   help="peers: tiny sizes (128-token prompts, 8 decode tokens, 1 repeat, 2 users), a smoke run; "
                        "policies: small traces (300 Mooncake requests, 100 ShareGPT conversations)")
    b.add_argument("--traces", nargs="+", default=["mooncake", "sharegpt"], help="policies: workloads to replay")
    b.add_argument("--pool-fractions", type=float, nargs="+", default=[0.05, 0.10, 0.25, 0.50],
                   help="policies: pool sizes as fractions of each trace's working set (plus unbounded)")
    b.add_argument("--cost-model", default=None, metavar="FILE",
                   help="policies: reuse a cost model (a saved policies.json or {coef: ...}) instead of measuring")
    b.add_argument("--ttft-slo-ms", type=float, default=None,
                   help="policies: TTFT SLO (default: per trace, the cold prefill time of its median prompt)")
    b.add_argument("--load", type=float, default=0.8,
                   help="policies: arrivals stretched so that computing every prompt cold keeps the engine this busy")
    b.add_argument("--no-validate", action="store_true", help="policies: skip the short replay on the real model")
    b.add_argument("--window-len", type=int, default=512, help="perplexity: tokens per window")
    b.add_argument("--windows", type=int, default=8, help="perplexity: number of windows")
    args = parser.parse_args(argv)
    from promptstash.errors import PromptstashError

    try:
        commands = {"generate": cmd_generate, "serve": cmd_serve, "route": cmd_route, "bench": cmd_bench}
        return commands[args.command](args)
    except PromptstashError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
