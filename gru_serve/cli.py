"""gru-serve: serve GRU language models over gRPC, and talk to a server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

import grpc

from gru_serve.ops import logs
from gru_serve.ops.settings import REPEATABLE_FLAGS, Settings, allowed, env_var, flag

DEFAULT_TARGET = "127.0.0.1:50051"


def add_setting_flags(p: argparse.ArgumentParser) -> None:
    """One flag per Settings field, its help the field's docstring; unset flags fall back to
    GRU_SERVE_* then the default."""
    # Flags stay strings: Settings parses and range-checks flags and variables alike, so a bad
    # value gets the same one-line refusal whichever way it came.
    for name, f in Settings.model_fields.items():
        env = f"env {env_var(name)}"
        if name in REPEATABLE_FLAGS:
            flag_, metavar = REPEATABLE_FLAGS[name]
            help_ = f"{f.description}; repeatable ({env}, comma-separated)"
            p.add_argument(flag_, dest=name, action="append", metavar=metavar, help=help_)
            continue
        rng = allowed(name)
        default = "unset" if f.default == "" else f.default
        p.add_argument(
            flag(name),
            default=None,
            help=f"{f.description} ({rng + '; ' if rng else ''}default {default}; {env})",
        )


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """One flag per SamplingParams field (--top-k for top_k), its help the field's."""
    from dataclasses import fields

    from gru_serve.sampling import SamplingParams

    for f in fields(SamplingParams):
        name, help_ = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type.startswith("tuple"):
            p.add_argument(name, action="append", help=help_)
        else:
            p.add_argument(name, type=float if f.type == "float" else int, help=help_)


def sampling_args(args: argparse.Namespace) -> dict:
    """The sampling flags' values by option name, for gru_serve.client.sampling."""
    from gru_serve.sampling import OPTIONS

    return {name: getattr(args, name) for name in OPTIONS if name != "stop"} | {"stop": args.stop or ()}


def cmd_serve(args: argparse.Namespace) -> int:
    from gru_serve.ops.errors import ModelLoadError
    from gru_serve.server import serve

    try:
        settings = Settings.load(**{k: v for k, v in vars(args).items() if k in Settings.model_fields})
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


def _read_snapshot(path: str) -> bytes:
    from pathlib import Path

    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SystemExit(f"gru-serve: error: snapshot {path}: {e.strerror}") from None


def _write_atomically(path: str, data: bytes) -> None:
    """Whole or not at all: a reader never sees half a snapshot, and a failure keeps the old one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def cmd_generate_choices(args: argparse.Namespace) -> int:
    """Fan-out: each choice's text on its own line once the stream ends."""
    from gru_serve.client import sampling

    if args.snapshot:
        print("gru-serve: error: --snapshot does not go with -n, --commit or --best-of", file=sys.stderr)
        return 2
    params = sampling(**sampling_args(args))
    texts: list[list[str]] = [[] for _ in range(max(args.n, 1))]
    finished = {}
    with _client(args) as c:
        stream = c.generate(
            args.prompt,
            args.session,
            args.max_tokens,
            params,
            args.logprobs,
            args.model,
            n=args.n,
            commit=args.commit,
            best_of=args.best_of,
        )
        for msg in stream:
            for t in msg.tokens:
                texts[t.choice].append(f"{t.text}[{t.logprob:.2f}]" if args.logprobs else t.text)
            if msg.HasField("finished"):
                finished[msg.finished.choice] = msg.finished
    for i, text in enumerate(texts):
        f = finished.get(i)
        mark = ", committed" if f is not None and f.committed else ""
        print(f"[choice {i}{mark}] {''.join(text)}")
        if f is not None and args.verbose:
            print(
                f"[choice {i}: {f.generated_tokens} tokens, logprob sum {f.logprob_sum:.2f}, seed {f.seed}; "
                f"session tokens {f.tokens_seen}]",
                file=sys.stderr,
            )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from gru_serve.client import sampling

    if args.n > 1 or args.commit is not None or args.best_of:
        return cmd_generate_choices(args)
    params = sampling(**sampling_args(args))
    snapshot = _read_snapshot(args.snapshot) if args.snapshot else b""
    with _client(args) as c:
        finished = None
        stream = c.generate(
            args.prompt, args.session, args.max_tokens, params, args.logprobs, args.model, snapshot=snapshot
        )
        for msg in stream:
            for t in msg.tokens:
                sys.stdout.write(f"{t.text}[{t.logprob:.2f}]" if args.logprobs else t.text)
            sys.stdout.flush()
            if msg.HasField("finished"):
                finished = msg.finished
    print()
    if finished is not None and finished.snapshot:
        _write_atomically(args.snapshot, finished.snapshot)
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
    if s.turns:
        print(f"turns       {s.turns[0].turn}..{s.turns[-1].turn} (rewind to any of them)")


def _print_turns(s) -> None:
    print(f"{'turn':>6}  {'tokens_seen':>11}  committed")
    for t in s.turns:
        print(f"{t.turn:>6}  {t.tokens_seen:>11}  {t.committed.ToJsonString()}")


def _turn(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a turn is a whole number >= 0, not {text!r}")
    return int(text)


def cmd_session(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.action == "create":
            s = c.create_session(args.arg or "", args.model)
            print(s.session_id) if args.quiet else _print_session(s)
        elif args.action == "show":
            _print_session(c.get_session(args.arg))
        elif args.action in ("export", "import") and not args.arg:
            what = "ID -o FILE" if args.action == "export" else "FILE"
            print(f"gru-serve: error: session {args.action} needs {what}", file=sys.stderr)
            return 2
        elif args.action == "export":
            if not args.output:
                print("gru-serve: error: session export needs -o FILE", file=sys.stderr)
                return 2
            _write_atomically(args.output, c.export_session(args.arg))
        elif args.action == "import":
            print(c.import_session(_read_snapshot(args.arg)).session_id)
        elif args.action == "delete":
            c.delete_session(args.arg)
            print(f"deleted {args.arg}")
        elif args.action == "turns":
            _print_turns(c.get_session(args.arg))
        elif args.action == "rewind":
            if args.turn is None:
                print("gru-serve: error: session rewind needs ID and TURN", file=sys.stderr)
                return 2
            _print_session(c.rewind_session(args.arg, args.turn))
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
    from gru_serve.engine.cuda import cuda_status

    # CUDA on this machine, as onnxruntime sees it: its own reason when it cannot start.
    ok, reason = cuda_status()
    print(f"cuda here  {'starts' if ok else 'cannot start: ' + reason}")
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
    g.add_argument(
        "--snapshot",
        metavar="FILE",
        help="continue from this snapshot (`session export`) instead of a session; the new one replaces it",
    )
    g.add_argument("--max-tokens", type=int, default=None, help="tokens to generate (server default 64)")
    add_sampling_flags(g)
    g.add_argument("--logprobs", action="store_true", help="print each token's log-probability")
    g.add_argument(
        "-n",
        type=int,
        default=0,
        metavar="N",
        help="sample N continuations of the same state together (choice i with seed + i), "
        "printed one per line at the end",
    )
    keep = g.add_mutually_exclusive_group()
    keep.add_argument(
        "--commit", type=int, metavar="I", help="with -n and --session: the session keeps choice I"
    )
    keep.add_argument(
        "--best-of",
        action="store_true",
        help="with -n and --session: the session keeps the choice with the highest total log-probability",
    )
    g.add_argument("-v", "--verbose", action="store_true", help="print timing at the end")
    g.set_defaults(func=cmd_generate)

    se = client_parser(
        "session", "create, show, delete, fork, rewind, export or import a session, or list its turns"
    )
    se.add_argument(
        "action", choices=["create", "show", "delete", "fork", "turns", "rewind", "export", "import"]
    )
    se.add_argument(
        "arg", nargs="?", help="create: initial text; import: a snapshot file; others: the session id"
    )
    se.add_argument(
        "turn",
        nargs="?",
        type=_turn,
        metavar="TURN",
        help="rewind: the turn to return to (`session turns ID` lists them)",
    )
    se.add_argument("-q", "--quiet", action="store_true", help="print only the new session id")
    se.add_argument("-o", "--output", metavar="FILE", help="export: write the snapshot to FILE")
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
