"""Export a checkpoint to the stateful ONNX graph of gru_serve.contract, with metadata."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from exporters.corpus import DEFAULT_MAX_TOKENS, TIME_MACHINE_SHA1, Corpus
from exporters.model import Checkpoint, StatefulLM
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


def evaluation_split(checkpoint: Checkpoint) -> tuple[list[int], list[int]] | None:
    """The (train, held-out) Time Machine tokens for a checkpoint: the tokens it was trained on
    (d2l's first 10,000 for a raw d2l state_dict with the Time Machine vocabulary) and the last
    10% of the book when the model never saw it."""
    corpus = Corpus.time_machine()
    if tuple(checkpoint.vocab.tokens) != corpus.vocab.tokens:
        return None
    recipe = checkpoint.info.get("recipe", {})
    max_tokens, holdout = recipe.get("max_tokens", DEFAULT_MAX_TOKENS), recipe.get("holdout", 0.0)
    train, held = corpus.split(max_tokens, holdout)
    if not held:
        unseen = corpus.split(0, HELDOUT_FRACTION)[1]
        held = unseen if max_tokens and max_tokens <= len(corpus.ids) - len(unseen) else []
    return train, held


def describe(cfg, recipe: dict | None) -> str:
    arch = f"GRU LM, {cfg.num_layers} x {cfg.hidden_size} hidden"
    if not recipe:
        return f"{arch}, exported from a d2l-style state_dict"
    tokens = f"the first {recipe['max_tokens']:,}" if recipe["max_tokens"] else "all"
    held = f", last {recipe['holdout']:.0%} held out" if recipe["holdout"] else ""
    return (
        f"{arch}; {recipe['optimizer']} lr {recipe['lr']:g}, {recipe['epochs']} epochs, batch "
        f"{recipe['batch_size']} x {recipe['num_steps']} steps on {tokens} training tokens"
        f"{held}"
    )


def write_graph(checkpoint: Checkpoint, path: Path) -> None:
    cfg = checkpoint.model.config
    example = (
        torch.zeros(EXAMPLE_BATCH, 3, dtype=torch.long),
        torch.zeros(EXAMPLE_BATCH, cfg.num_layers, cfg.hidden_size),
    )
    batch_seq = {0: BATCH_AXIS, 1: SEQ_AXIS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter warns about GRU batch sizes; we pass h0
        torch.onnx.export(
            StatefulLM(checkpoint.model).eval(),
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


def export(
    checkpoint: Checkpoint, out: Path, name: str, atol_logits: float = 1e-4, atol_state: float = 1e-5
) -> ValidationReport:
    """Write `out` (atomically) and validate it against the checkpoint."""
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"output {out} is a directory; give a file name such as model.onnx")
    if not os.access(out.parent if str(out.parent) else Path("."), os.W_OK):
        raise ExportError(f"cannot write {out}: directory {out.parent} is not writable or does not exist")
    cfg = checkpoint.model.config
    fd, tmp_name = tempfile.mkstemp(suffix=".onnx", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_graph(checkpoint, tmp)
        split = evaluation_split(checkpoint)
        ppl: dict[str, float] = {}
        if split:
            step, shape = ort_step(tmp), (cfg.num_layers, cfg.hidden_size)
            train_ids, heldout = split
            ppl["train_d2l"] = d2l_perplexity(step, train_ids, shape)
            ppl["train_stream"] = stream_perplexity(step, train_ids, shape)
            if heldout:
                ppl["heldout_stream"] = stream_perplexity(step, heldout, shape)
        recipe = checkpoint.info.get("recipe")
        meta = ModelMetadata(
            name=name,
            vocab=checkpoint.vocab.tokens,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_layers,
            normalization=dict(checkpoint.vocab.normalization),
            corpus_sha1=checkpoint.info.get("corpus_sha1", TIME_MACHINE_SHA1 if split else ""),
            perplexity=ppl,
            description=describe(cfg, recipe),
        )
        graph = onnx.load(str(tmp))
        graph.producer_name = "gru-serve"
        onnx.helper.set_model_props(graph, meta.to_props())
        onnx.save(graph, str(tmp))
        report = validate(tmp, checkpoint, atol_logits, atol_state, ppl_tokens=split[0] if split else None)
        tmp.replace(out)
        report.path = out
        return report
    finally:
        tmp.unlink(missing_ok=True)
