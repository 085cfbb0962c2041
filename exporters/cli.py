"""gru-export: train, export, validate and inspect stateful ONNX GRU language models."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from exporters import card
from exporters.corpus import DEFAULT_MAX_TOKENS, CorpusError
from exporters.model import CheckpointError, load_checkpoint
from gru_serve.contract import ContractError

EXIT_FAILED = 1  # the model was read but failed validation
EXIT_BAD_INPUT = 2  # the input could not be used at all


def cmd_train(args: argparse.Namespace) -> int:
    from exporters.train import TokenizerTrainConfig, TrainConfig, train, train_tokenized

    if args.corpus and not args.tokenizer:
        raise CorpusError(
            "--corpus needs --tokenizer char|word|bpe:N (d2l's recipe trains on the Time Machine)"
        )
    if not args.tokenizer:
        for flag in ("embedding_size", "tie_weights"):
            if getattr(args, flag):
                raise CorpusError(f"--{flag.replace('_', '-')} is for --tokenizer models (embedding input)")
    kind = TokenizerTrainConfig if args.tokenizer else TrainConfig
    names = {f.name for f in fields(kind)}
    cfg = kind(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    if args.tokenizer:
        from exporters.tokenizer import parse_kind

        parse_kind(args.tokenizer)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = train_tokenized(cfg) if args.tokenizer else train(cfg)
    m = result.metrics
    print(
        f"perplexity {m['train_d2l']:.3f} (d2l way, training tokens), "
        f"{m['train_stream']:.3f} (one stream, batch 1)"
        + (f", held-out {m['heldout_stream']:.3f}" if "heldout_stream" in m else "")
        + (f" ({m['heldout_bpc']:.4f} bits per character)" if "heldout_bpc" in m else "")
    )
    print(f"{m['tokens_per_second']:,.0f} tokens/s over {m['train_seconds']:.0f} s")
    for text in result.samples.values():
        print(f"  {text}")
    result.checkpoint.save(out)
    print(f"saved {out}")
    return 0


def _load(args: argparse.Namespace):
    """The checkpoint named by the export/validate flags."""
    from exporters.tokenizer import read_tokenizer

    if args.split and not args.tokenizer:
        raise CheckpointError("--split applies to a word list given with --tokenizer vocab.txt")
    tokenizer = read_tokenizer(Path(args.tokenizer), args.split) if args.tokenizer else None
    return load_checkpoint(
        Path(args.checkpoint),
        Path(args.vocab) if args.vocab else None,
        tokenizer=tokenizer,
        trust_pickle=args.trust_pickle,
        time_major={"auto": None, "time-major": True, "batch-first": False}[args.layout],
        pythonpath=tuple(Path(p) for p in args.pythonpath),
    )


def cmd_export(args: argparse.Namespace) -> int:
    from exporters.export import export

    ck = _load(args)
    name = args.name or Path(args.output).stem
    report = export(ck, Path(args.output), name, args.atol, args.atol_state)
    for line in report.checks:
        print(f"  {line}")
    if args.card:
        Path(args.card).write_text(card.render(report, ck), encoding="utf-8")
        print(f"wrote model card {args.card}")
    print(f"exported and validated {args.output}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from exporters.export import evaluation_split
    from exporters.validate import validate

    ck = _load(args) if args.checkpoint else None
    split = evaluation_split(ck) if ck else None
    report = validate(
        Path(args.model), ck, args.atol, args.atol_state, ppl_tokens=split.train if split else None
    )
    for line in report.checks:
        print(f"  {line}")
    print(f"{args.model}: valid")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from exporters.validate import load_graph, read_metadata
    from gru_serve.contract import graph_io, gru_nodes

    path = Path(args.model)
    model = load_graph(path)
    meta = read_metadata(model)
    print(
        f"{path}  {path.stat().st_size / 1e6:.2f} MB  opset "
        f"{', '.join(str(o.version) for o in model.opset_import)}  producer {model.producer_name}"
    )
    print("contract:")
    io = graph_io(model)
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for v in values:
            dtype, shape = io[v.name]
            print(f"  {kind:6} {v.name:10} {dtype:8} [{', '.join(map(str, shape))}]")
    print(f"GRU nodes: {len(list(gru_nodes(model.graph)))} (linear_before_reset=1)")
    print("metadata:")
    print(f"  name          {meta.name}")
    shown = " ".join(repr(t) for t in meta.vocab[:60]) + (" ..." if meta.vocab_size > 60 else "")
    print(f"  vocab ({meta.vocab_size:3})   {shown}")
    print(
        f"  tokenizer     {meta.tokenizer}"
        + (f" ({len(meta.tokenizer_json):,} characters of JSON)" if meta.tokenizer_json else "")
    )
    print(f"  input         {meta.input_kind}")
    print(f"  layers        {meta.num_layers}")
    print(f"  hidden        {meta.hidden_size}")
    print(f"  normalization {meta.normalization}")
    print(f"  corpus sha1   {meta.corpus_sha1 or '-'}")
    for k, v in meta.perplexity.items():
        print(f"  perplexity    {k} = {v:.4f}")
    if meta.description:
        print(f"  description   {meta.description}")
    return 0


def cmd_triton_repo(args: argparse.Namespace) -> int:
    from exporters.triton import write_repository

    repo = write_repository(
        Path(args.model), Path(args.output), args.name, args.max_batch_size, args.max_sequence_idle_us
    )
    print(f"wrote Triton model repository {args.output}: {repo.config_path}, {repo.model_path}")
    return 0


def cmd_variants(args: argparse.Namespace) -> int:
    from exporters.variants import main_variants

    ck = _load(args) if args.checkpoint else None
    kinds = tuple(k for k in args.kinds.split(",") if k)
    return main_variants(Path(args.model), Path(args.output), kinds, ck)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gru-export", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train a GRU language model on the Time Machine, or on any text with --tokenizer",
        description="Train with d2l's recipe by default (d2l.ai §9.1): one-hot characters of the "
        "Time Machine, d2l-normalised. With --tokenizer char|word|bpe:N: an embedding-input GRU "
        "(PyTorch word_language_model's layout) on any UTF-8 text (--corpus; default the Time "
        "Machine as written), with a tokenizer trained on the training part; the checkpoint "
        "holds the tokenizer. Defaults: d2l's / the tokenizer recipe's.",
    )
    t.add_argument("-o", "--output", default="checkpoints/model.pt", help="checkpoint to write")
    t.add_argument("--corpus", help="UTF-8 text file to train on (with --tokenizer)")
    t.add_argument(
        "--tokenizer",
        help="char (the corpus's characters), word (whitespace-split words, <eos> at line ends) or "
        "bpe:N (byte-level BPE with N tokens); not given: d2l's one-hot recipe",
    )
    t.add_argument("--embedding-size", type=int, help="embedding width (tokenizer models; 128)")
    t.add_argument(
        "--tie-weights",
        action="store_true",
        default=None,
        help="decoder weight = embedding (tokenizer models; with a hidden -> embedding projection "
        "when the sizes differ)",
    )
    t.add_argument("--hidden-size", type=int, help="GRU width (d2l 256, tokenizer 256)")
    t.add_argument("--num-layers", type=int, help="GRU layers (d2l 1, tokenizer 2)")
    t.add_argument(
        "--dropout",
        type=float,
        help="between GRU layers, and on the embedding and before the head (d2l 0, tokenizer 0.3)",
    )
    t.add_argument("--batch-size", type=int, help="(32)")
    t.add_argument("--num-steps", type=int, help="truncated BPTT length (35)")
    t.add_argument("--epochs", type=int, help="(d2l 500, tokenizer 20)")
    t.add_argument("--lr", type=float, help="(d2l 1, tokenizer 0.003)")
    t.add_argument("--optimizer", choices=["sgd", "adam"], help="(d2l sgd, tokenizer adam)")
    t.add_argument("--clip", type=float, help="gradient-norm clip (1)")
    t.add_argument(
        "--max-tokens",
        type=int,
        help=f"train on the first N tokens, 0: all before the held-out part (d2l {DEFAULT_MAX_TOKENS}, "
        "tokenizer 0)",
    )
    t.add_argument(
        "--holdout",
        type=float,
        help="fraction at the end of the text kept for held-out perplexity (d2l 0, tokenizer 0.1)",
    )
    t.add_argument("--random-iter", action="store_true", default=None, help="d2l's random sampling iterator")
    t.add_argument("--seed", type=int, help="(0)")
    t.add_argument("--eval-every", type=int, help="epochs between held-out checks (d2l 10, tokenizer 1)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "export",
        help="export a checkpoint to stateful ONNX and validate it",
        description="Export a GRU language model: our checkpoints, a d2l RNNModel or PyTorch "
        "word_language_model (GRU) state_dict, or with --trust-pickle a whole module saved with "
        "torch.save(model, f) (its class's module must be importable: PYTHONPATH or --pythonpath). "
        "Only GRUs: the contract has one state tensor [batch, layers, hidden].",
    )
    e.add_argument("checkpoint", help="our checkpoint, a state_dict file, or a pickled module")
    e.add_argument("-o", "--output", required=True, help="ONNX file to write")
    e.add_argument("--name", help="model name in the metadata (default: output file stem)")
    e.add_argument("--card", help="also write a model card (Markdown) here")
    _model_flags(e)
    _tolerances(e)
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("validate", help="validate an exported model")
    v.add_argument("model")
    v.add_argument("--checkpoint", help="check numerical parity against this checkpoint (or module pickle)")
    _model_flags(v)
    _tolerances(v)
    v.set_defaults(func=cmd_validate)

    i = sub.add_parser("info", help="print a model's contract, metadata and size")
    i.add_argument("model")
    i.set_defaults(func=cmd_info)

    from exporters import triton

    r = sub.add_parser(
        "triton-repo",
        help="write a Triton model repository (implicit state) for a model",
        description="Write REPO/<name>/config.pbtxt and REPO/<name>/1/model.onnx; Triton keeps each "
        "sequence's state (sequence batching, oldest strategy).",
    )
    r.add_argument("model", help="exported ONNX model")
    r.add_argument("-o", "--output", required=True, help="repository directory (REPO/<name>/...)")
    r.add_argument("--name", type=triton.parse_name, help="Triton model name (default: the metadata name)")
    r.add_argument(
        "--max-batch-size",
        type=triton.parse_positive_int,
        default=triton.DEFAULT_MAX_BATCH_SIZE,
        help=f"largest batch Triton forms (default {triton.DEFAULT_MAX_BATCH_SIZE})",
    )
    r.add_argument(
        "--max-sequence-idle-us",
        type=triton.parse_positive_int,
        default=triton.DEFAULT_MAX_SEQUENCE_IDLE_US,
        help="microseconds after which Triton ends an idle sequence and drops its state "
        f"(default {triton.DEFAULT_MAX_SEQUENCE_IDLE_US})",
    )
    r.set_defaults(func=cmd_triton_repo)

    va = sub.add_parser(
        "variants",
        help="write the optimized, fp16, decode and fused variants of a model, validated",
        description="Write DIR/{optimized,fp16,decode,fused}.onnx and DIR/variants.json (checks, "
        "differences from the base model, perplexity change).",
    )
    va.add_argument("model", help="exported ONNX model")
    va.add_argument("-o", "--output", required=True, help="directory to write the variants to")
    va.add_argument("--kinds", default="optimized,fp16,decode,fused", help="comma-separated variants")
    va.add_argument("--checkpoint", help="also check the optimized variant's parity with this checkpoint")
    _model_flags(va)
    va.set_defaults(func=cmd_variants)
    return p


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vocab", help="d2l character vocabulary file, one token per line ('<space>' for ' ')")
    p.add_argument(
        "--tokenizer",
        help="the model's tokenizer: a Hugging Face tokenizer.json, or a word list (vocab.txt, one "
        "token per line in id order; <eos> and <unk> used if present)",
    )
    p.add_argument(
        "--split",
        choices=["whitespace", "chars"],
        help="how a word list's tokenizer splits each line (default whitespace)",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load a whole pickled module (torch.save(model, f)); unpickling runs code from the file",
    )
    p.add_argument(
        "--pythonpath",
        action="append",
        default=[],
        metavar="DIR",
        help="directory to import a pickled module's class from (repeatable; like PYTHONPATH)",
    )
    p.add_argument(
        "--layout",
        choices=["auto", "time-major", "batch-first"],
        default="auto",
        help="how a module's forward takes ids: [seq, batch] or [batch, seq] (auto: from its "
        "nn.GRU's batch_first)",
    )


def _tolerances(p: argparse.ArgumentParser) -> None:
    p.add_argument("--atol", type=float, default=1e-4, help="tolerance on logits (default 1e-4)")
    p.add_argument("--atol-state", type=float, default=1e-5, help="tolerance on state_out (default 1e-5)")


def main(argv: list[str] | None = None) -> int:
    from exporters.export import ExportError
    from exporters.tokenizer import TokenizerError
    from exporters.validate import GraphError, ValidationError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (
        CheckpointError,
        CorpusError,
        ContractError,
        ExportError,
        GraphError,
        TokenizerError,
        OSError,
    ) as e:
        print(f"gru-export: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValidationError as e:
        print(f"gru-export: validation failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("gru-export: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
