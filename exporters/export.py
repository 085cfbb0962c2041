"""Export a checkpoint to the stateful ONNX graph of gru_serve.contract, with metadata."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from exporters.corpus import DEFAULT_MAX_TOKENS, TIME_MACHINE_SHA1, Corpus
from exporters.embedding import name_graph
from exporters.evaluation import EvalSplit, read_corpus_text, tokenized_split
from exporters.evaluation import perplexities as tokenizer_perplexities
from exporters.model import Checkpoint, module_checkpoint
from exporters.tokenizer import as_tokenizer
from exporters.validate import ValidationReport, ort_step, validate
from gru_serve.contract import (
    BATCH_AXIS,
    INPUT_IDS,
    LOGITS,
    OPSET,
    SEQ_AXIS,
    STATE,
    STATE_OUT,
    ModelMetadata,
)
from gru_serve.scoring import d2l_perplexity, stream_perplexity

HELDOUT_FRACTION = 0.1
EXAMPLE_BATCH = 2  # validation runs batch 1 and 7, so a pinned batch axis cannot hide


class ExportError(RuntimeError):
    pass


def evaluation_split(checkpoint: Checkpoint) -> EvalSplit | None:
    """The (train, held-out) tokens for a checkpoint. d2l characters: the Time Machine tokens it
    was trained on (d2l's first 10,000 for a raw d2l state_dict with the Time Machine
    vocabulary) and the last 10% of the book when the model never saw it. A tokenizer model
    trained by gru-export: its own corpus split (the recorded file, if it is still there),
    with the held-out text's length for bits per character. Otherwise None."""
    if checkpoint.tokenizer is not None:
        corpus_rec = checkpoint.info.get("corpus")
        text = read_corpus_text(corpus_rec) if corpus_rec else None
        if text is None:
            return None
        return tokenized_split(
            checkpoint.tokenizer.encode, text, corpus_rec["holdout"], corpus_rec.get("max_tokens", 0)
        )[0]
    corpus = Corpus.time_machine()
    if checkpoint.vocab is None or tuple(checkpoint.vocab.tokens) != corpus.vocab.tokens:
        return None
    recipe = checkpoint.info.get("recipe", {})
    max_tokens, holdout = recipe.get("max_tokens", DEFAULT_MAX_TOKENS), recipe.get("holdout", 0.0)
    train, held = corpus.split(max_tokens, holdout)
    if not held:
        unseen = corpus.split(0, HELDOUT_FRACTION)[1]
        held = unseen if max_tokens and max_tokens <= len(corpus.ids) - len(unseen) else []
    return EvalSplit(train, held)


def describe(cfg, recipe: dict | None, checkpoint: Checkpoint | None = None) -> str:
    arch = f"GRU LM, {cfg.num_layers} x {cfg.hidden_size} hidden"
    if checkpoint is not None and checkpoint.io is not None:
        return describe_module(checkpoint, recipe)
    if not recipe:
        return f"{arch}, exported from a d2l-style state_dict"
    tokens = f"the first {recipe['max_tokens']:,}" if recipe["max_tokens"] else "all"
    held = f", last {recipe['holdout']:.0%} held out" if recipe["holdout"] else ""
    return (
        f"{arch}; {recipe['optimizer']} lr {recipe['lr']:g}, {recipe['epochs']} epochs, batch "
        f"{recipe['batch_size']} x {recipe['num_steps']} steps on {tokens} training tokens"
        f"{held}"
    )


def describe_module(checkpoint: Checkpoint, recipe: dict | None) -> str:
    """One line for an embedding (or other) GRU LM: layout, sizes, tokenizer, recipe."""
    cfg, model = checkpoint.config, checkpoint.model
    emb = getattr(getattr(model, "config", None), "embedding_size", None)
    tied = getattr(getattr(model, "config", None), "tie_weights", False)
    arch = (
        f"GRU LM, embedding {emb}, {cfg.num_layers} x {cfg.hidden_size} hidden" + (", tied" if tied else "")
        if emb
        else f"GRU LM ({checkpoint.source}), {cfg.num_layers} x {cfg.hidden_size} hidden"
    )
    tok = f"; {checkpoint.tokenizer.describe()}" if checkpoint.tokenizer else ""
    if not recipe:
        return f"{arch}{tok}, exported from {checkpoint.source or 'a module'}"
    corpus = checkpoint.info.get("corpus", {})
    held = f", last {recipe['holdout']:.0%} held out" if recipe.get("holdout") else ""
    return (
        f"{arch}{tok}; {recipe['optimizer']} lr {recipe['lr']:g}, {recipe['epochs']} epochs, batch "
        f"{recipe['batch_size']} x {recipe['num_steps']} steps on {Path(corpus.get('path', '?')).name}"
        f"{held}"
    )


def write_graph(checkpoint: Checkpoint, path: Path) -> str | None:
    """Export the checkpoint's module; for an embedding model, name the weights as
    exporters.embedding.EMBEDDING_GRAPH says. Returns the graph pattern (None: d2l one-hot, or a
    graph traced as is that is not the embedding pattern)."""
    cfg = checkpoint.config
    module, kind = checkpoint.exportable()
    example = (
        torch.zeros(EXAMPLE_BATCH, 3, dtype=torch.long),
        torch.zeros(EXAMPLE_BATCH, cfg.num_layers, cfg.hidden_size),
    )
    batch_seq = {0: BATCH_AXIS, 1: SEQ_AXIS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter warns about GRU batch sizes; we pass h0
        torch.onnx.export(
            module,
            example,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_IDS, STATE],
            output_names=[LOGITS, STATE_OUT],
            dynamic_axes={
                INPUT_IDS: batch_seq,
                STATE: {0: BATCH_AXIS},
                LOGITS: batch_seq,
                STATE_OUT: {0: BATCH_AXIS},
            },
        )
    if kind != "embedding":
        return None
    graph = onnx.load(str(path))
    pattern = name_graph(graph)
    onnx.save(graph, str(path))
    return pattern


def export(
    checkpoint: Checkpoint, out: Path, name: str, atol_logits: float = 1e-4, atol_state: float = 1e-5
) -> ValidationReport:
    """Write `out` (atomically) and validate it against the checkpoint."""
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"output {out} is a directory; give a file name such as model.onnx")
    if not os.access(out.parent if str(out.parent) else Path("."), os.W_OK):
        raise ExportError(f"cannot write {out}: directory {out.parent} is not writable or does not exist")
    if checkpoint.vocab is None:
        raise ExportError(
            f"the model ({checkpoint.source or 'a module'}) has no tokenizer: give it with "
            "--tokenizer tokenizer.json|vocab.txt"
        )
    cfg = checkpoint.config
    fd, tmp_name = tempfile.mkstemp(suffix=".onnx", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        pattern = write_graph(checkpoint, tmp)
        split = evaluation_split(checkpoint)
        ppl: dict[str, float] = {}
        if split:
            step, shape = ort_step(tmp), (cfg.num_layers, cfg.hidden_size)
            if checkpoint.tokenizer is not None:
                ppl = tokenizer_perplexities(step, split, shape)
            else:
                train_ids, heldout = split.train, split.heldout
                ppl["train_d2l"] = d2l_perplexity(step, train_ids, shape)
                ppl["train_stream"] = stream_perplexity(step, train_ids, shape)
                if heldout:
                    ppl["heldout_stream"] = stream_perplexity(step, heldout, shape)
        recipe = checkpoint.info.get("recipe")
        graph = onnx.load(str(tmp))
        tokenizer = checkpoint.tokenizer
        spec, tokenizer_json = tokenizer.metadata() if tokenizer else ({"kind": "chars"}, "")
        corpus_sha1 = checkpoint.info.get("corpus_sha1", TIME_MACHINE_SHA1 if split and not tokenizer else "")
        meta = ModelMetadata(
            name=name,
            vocab=checkpoint.vocab.tokens,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_layers,
            normalization=dict(
                checkpoint.vocab.normalization if tokenizer is None else tokenizer.normalization
            ),
            corpus_sha1=corpus_sha1,
            perplexity=ppl,
            description=describe(cfg, recipe, checkpoint),
            tokenizer=spec,
            tokenizer_json=tokenizer_json,
            input_kind="one_hot" if any(n.op_type == "OneHot" for n in graph.graph.node) else "embedding",
        )
        graph.producer_name = "gru-serve"
        onnx.helper.set_model_props(graph, meta.to_props())
        onnx.save(graph, str(tmp))
        report = validate(tmp, checkpoint, atol_logits, atol_state, ppl_tokens=split.train if split else None)
        if checkpoint.io is not None:
            report.checks.insert(
                3,
                f"graph: {pattern} (input {meta.input_kind})"
                if pattern
                else f"graph: traced from {checkpoint.source} as is (not the plain embedding pattern)",
            )
        tmp.chmod(0o644)  # mkstemp's file is private; the model is not
        tmp.replace(out)
        report.path = out
        return report
    finally:
        tmp.unlink(missing_ok=True)


def export_module(
    module: torch.nn.Module,
    path: Path | str,
    *,
    tokenizer,
    time_major: bool | None = None,
    name: str | None = None,
    split: str | None = None,
    atol_logits: float = 1e-4,
    atol_state: float = 1e-5,
) -> ValidationReport:
    """Export any GRU language model module to the contract, with its tokenizer, and validate
    it against the module (PyTorch parity over 200 chained steps at batch 1 and 7).

    The module's forward takes (ids, state) and returns (scores, new state): ids [seq, batch]
    when time_major (the default when its nn.GRU is not batch_first), else [batch, seq];
    state [layers, batch, hidden] as nn.GRU has it; scores [seq, batch, V], [batch, seq, V] or
    [seq * batch, V] (log-probabilities are fine). `tokenizer`: a tokenizer.json or vocab.txt
    path, a `tokenizers.Tokenizer`, an id -> token list (`split`: whitespace or chars for word
    lists) or an exporters.tokenizer.Tokenizer. Raises CheckpointError (not a GRU, sizes that
    differ, ...), ExportError, or exporters.validate.ValidationError."""
    path = Path(path)
    ck = module_checkpoint(module, as_tokenizer(tokenizer, split), time_major)
    return export(ck, path, name or path.stem, atol_logits, atol_state)


def validate_module(
    path: Path | str,
    module: torch.nn.Module,
    *,
    tokenizer=None,
    time_major: bool | None = None,
    split: str | None = None,
    atol_logits: float = 1e-4,
    atol_state: float = 1e-5,
) -> ValidationReport:
    """Validate an exported model against the module it came from (as export_module does)."""
    ck = module_checkpoint(
        module, as_tokenizer(tokenizer, split) if tokenizer is not None else None, time_major
    )
    return validate(Path(path), ck, atol_logits, atol_state)
