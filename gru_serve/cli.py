"""gru-serve: serve GRU language models over gRPC, and talk to a server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from dataclasses import fields

import grpc

from gru_serve import logs
from gru_serve.settings import ENV_PREFIX, Settings

DEFAULT_TARGET = "127.0.0.1:50051"

SETTING_HELP = {
    "models": "an ONNX model to serve as PATH or NAME=PATH (default: every shipped model)",
    "host": "address to listen on",
    "port": "port to listen on (0: any free port)",
    "device": "auto (CUDA when onnxruntime confirms it, else CPU), cuda (refuse to start without it), cpu",
    "intra_op_threads": "onnxruntime threads inside one operator",
    "inter_op_threads": "onnxruntime threads across operators",
    "io_binding": "auto (on with CUDA: the state stays on the GPU), on, off",
    "max_batch_size": "most streams decoded in one batched step",
    "fused_tokens": "most tokens a stream gets from one fused K-token run; 1: the step path only",
    "round_budget_ms": "a fused round is sized to take about this long (bounds inter-token latency)",
    "max_queue": "requests waiting for a batch slot before RESOURCE_EXHAUSTED",
    "session_ttl_s": "seconds an idle session lives",
    "max_sessions": "sessions kept; beyond it the least recently used idle one is evicted",
    "max_prompt_chars": "longest prompt or text accepted",
    "max_new_tokens": "most tokens one request may generate",
    "default_new_tokens": "tokens generated when a request does not say",
    "max_streams": "concurrent generation streams before RESOURCE_EXHAUSTED",
    "grace_s": "seconds in-flight requests get to finish on SIGTERM/SIGINT",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "session_store": "memory, or redis://HOST:PORT/DB to share sessions between replicas",
    "metrics_port": "serve Prometheus metrics over HTTP on this port (0: off)",
    "tls_cert": "PEM certificate chain; with --tls-key the server speaks TLS",
    "tls_key": "PEM private key of --tls-cert",
    "tls_client_ca": "PEM CA bundle; clients must present a certificate it signed (mTLS)",
    "auth_tokens": "accepted bearer tokens (comma-separated in the env); sessions belong to their token",
    "auth_tokens_file": "file with one accepted bearer token per line",
    "max_streams_per_token": "concurrent streams one token may hold",
}


# Settings that hold several values get a singular, repeatable flag.
REPEATABLE_FLAGS = {"models": ("--model", "[NAME=]PATH"), "auth_tokens": ("--auth-token", "TOKEN")}


def add_setting_flags(p: argparse.ArgumentParser) -> None:
    """One flag per Settings field; unset flags fall back to GRU_SERVE_* then the default."""
    defaults = Settings()
    for f in fields(Settings):
        default = getattr(defaults, f.name)
        env = f"env {ENV_PREFIX}{f.name.upper()}"
        if f.name in REPEATABLE_FLAGS:
            flag, metavar = REPEATABLE_FLAGS[f.name]
            p.add_argument(
                flag,
                dest=f.name,
                action="append",
                metavar=metavar,
                help=f"{SETTING_HELP[f.name]}; repeatable ({env}, comma-separated)",
            )
            continue
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(default),
            default=None,
            help=f"{SETTING_HELP.get(f.name, '')} (default {default}; {env})",
        )


def cmd_serve(args: argparse.Namespace) -> int:
    from gru_serve.errors import ModelLoadError
    from gru_serve.server import serve

    names = {f.name for f in fields(Settings)}
    try:
        settings = Settings.load(**{k: v for k, v in vars(args).items() if k in names})
    except ValueError as e:
        print(f"gru-serve: error: {e}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    logging.getLogger(__name__).info("settings: %s", settings.describe())
    try:
        return asyncio.run(serve(settings))
    except (ModelLoadError, OSError) as e:
        print(f"gru-serve: error: {e}", file=sys.stderr)
        return 2


def _client(args: argparse.Namespace):
    from pathlib import Path

    from gru_serve.client import Client, make_channel

    ca = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    return Client(args.target, make_channel(args.target, ca), token=args.token)


def cmd_generate(args: argparse.Namespace) -> int:
    from gru_serve.client import sampling

    params = sampling(args.temperature, args.top_k, args.top_p, args.seed, args.stop or ())
    with _client(args) as c:
        finished = None
        for msg in c.generate(args.prompt, args.session, args.max_tokens, params, args.logprobs, args.model):
            for t in msg.tokens:
                sys.stdout.write(f"{t.text}[{t.logprob:.2f}]" if args.logprobs else t.text)
            sys.stdout.flush()
            if msg.HasField("finished"):
                finished = msg.finished
    print()
    if finished is not None and args.verbose:
        print(
            f"[{finished.generated_tokens} tokens, first after "
            f"{finished.time_to_first_token_s * 1000:.1f} ms, "
            f"{finished.total_time_s * 1000:.1f} ms in all; session tokens {finished.tokens_seen}]",
            file=sys.stderr,
        )
    return 0


def _print_session(s) -> None:
    print(
        f"session_id  {s.session_id}\nmodel       {s.model}\ntokens_seen {s.tokens_seen}\n"
        f"created     {s.created.ToJsonString()}\nlast_used   {s.last_used.ToJsonString()}\n"
        f"expires     {s.expires.ToJsonString()}"
    )


def cmd_session(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.action == "create":
            s = c.create_session(args.arg or "", args.model)
            print(s.session_id) if args.quiet else _print_session(s)
        elif args.action == "show":
            _print_session(c.get_session(args.arg))
        elif args.action == "delete":
            c.delete_session(args.arg)
            print(f"deleted {args.arg}")
        else:
            s = c.fork_session(args.arg)
            print(s.session_id) if args.quiet else _print_session(s)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    with _client(args) as c:
        r = c.score(args.text, args.session, args.commit, args.model)
    print(f"perplexity {r.perplexity:.4f} over {len(r.tokens)} tokens")
    if args.tokens:
        for t in r.tokens:
            print(f"  {t.text!r:8} {t.logprob:8.4f}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as c:
        m = c.model_info(args.model)
    print(f"model      {m.name} (default {m.default_model}; serving {', '.join(m.models)})")
    print(f"provider   {m.provider}\nsize       {m.num_layers} x {m.hidden_size}, vocab {len(m.vocab)}")
    print(f"hash       {m.model_hash}")
    for k, v in sorted(m.perplexity.items()):
        print(f"perplexity {k} = {v:.4f}")
    print(f"limits     {str(m.limits).strip().replace(chr(10), ', ')}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from gru_serve.bench.run import main as bench

    return bench(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gru-serve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "serve",
        help="run the gRPC server",
        description="Serve models over gRPC until SIGTERM/SIGINT, then drain.",
    )
    add_setting_flags(s)
    s.set_defaults(func=cmd_serve)

    def client_parser(name: str, help_: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_)
        c.add_argument("--target", default=DEFAULT_TARGET, help=f"server address (default {DEFAULT_TARGET})")
        c.add_argument("--model", default="", help="model name (default: the server's default)")
        c.add_argument(
            "--token",
            default=os.environ.get("GRU_SERVE_TOKEN", ""),
            help="bearer token (default: env GRU_SERVE_TOKEN)",
        )
        c.add_argument("--tls-ca", help="PEM CA certificate: connect with TLS and trust this CA")
        return c

    g = client_parser("generate", "stream a generation, printing tokens as they arrive")
    g.add_argument("prompt", nargs="?", default="", help="text to append before generating")
    g.add_argument("--session", default="", help="continue this session (default: a one-off)")
    g.add_argument("--max-tokens", type=int, default=None, help="tokens to generate (server default 64)")
    g.add_argument("--temperature", type=float, help="0 or unset: greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, help="makes sampling reproducible")
    g.add_argument("--stop", action="append", help="stop after this string, repeatable")
    g.add_argument("--logprobs", action="store_true", help="print each token's log-probability")
    g.add_argument("-v", "--verbose", action="store_true", help="print timing at the end")
    g.set_defaults(func=cmd_generate)

    se = client_parser("session", "create, show, delete or fork a session")
    se.add_argument("action", choices=["create", "show", "delete", "fork"])
    se.add_argument("arg", nargs="?", help="create: initial text; others: the session id")
    se.add_argument("-q", "--quiet", action="store_true", help="print only the new session id")
    se.set_defaults(func=cmd_session)

    sc = client_parser("score", "perplexity of a text")
    sc.add_argument("text")
    sc.add_argument("--session", default="", help="score from this session's state")
    sc.add_argument("--commit", action="store_true", help="append the text to the session")
    sc.add_argument("--tokens", action="store_true", help="print each token's log-probability")
    sc.set_defaults(func=cmd_score)

    i = client_parser("info", "the model, its provider and the server's limits")
    i.set_defaults(func=cmd_info)

    from gru_serve.bench.run import add_arguments as bench_arguments

    b = sub.add_parser(
        "bench",
        help="latency and throughput, in process and served, beside PyTorch eager and a PyTorch gRPC server",
        description="Benchmark in one run: in-process decode loops, a served concurrency sweep and the "
        "baselines; a table, results.json, PNG plots and a Markdown report.",
    )
    bench_arguments(b)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except grpc.RpcError as e:
        print(f"gru-serve: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
