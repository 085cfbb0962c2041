"""Validation of an exported model: structure, contract, metadata, GRU semantics, numerical
parity with PyTorch over chained stateful calls, and perplexity."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from exporters.corpus import Corpus
from exporters.model import Checkpoint, torch_step
from gru_serve.contract import (
    INPUT_IDS,
    LOGITS,
    STATE,
    STATE_OUT,
    ContractError,
    ModelMetadata,
    gru_nodes,
    read_model,
)
from gru_serve.reference import chained_run
from gru_serve.scoring import StepFn, d2l_perplexity

PARITY_BATCHES = (1, 7)  # neither is the export example's batch (2)
PROMPT_LEN = 16
CHAINED_STEPS = 200


class ValidationError(Exception):
    """An exported model failed validation; the message names what and by how much."""


class GraphError(ValidationError):
    pass


class ContractMismatch(ValidationError):
    pass


class ToleranceExceeded(ValidationError):
    def __init__(self, output: str, worst: float, atol: float, where: str) -> None:
        self.output, self.worst, self.atol = output, worst, atol
        super().__init__(f"'{output}' differs by up to {worst:.3g} (atol {atol:g}) {where}")


class PerplexityMismatch(ValidationError):
    pass


@dataclass
class ValidationReport:
    path: Path
    metadata: ModelMetadata
    worst: dict[str, float] = field(default_factory=dict)  # output -> max abs diff
    perplexity: dict[str, float] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)


def load_graph(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
    except FileNotFoundError as e:
        raise GraphError(f"{path} does not exist") from e
    except Exception as e:  # onnx raises DecodeError, ValidationError, ... on bad files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GraphError(f"{path} is not a valid ONNX model: {msg}") from e
    return model


def read_metadata(model: onnx.ModelProto) -> ModelMetadata:
    try:
        return read_model(model)
    except ContractError as e:  # gru_serve.contract.LinearBeforeResetError among them
        raise ContractMismatch(str(e)) from e


def ort_step(path: Path) -> StepFn:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def step(ids: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, out = sess.run([LOGITS, STATE_OUT], {INPUT_IDS: ids, STATE: state})
        return logits, out

    return step


def parity_inputs(meta: ModelMetadata, batch: int) -> np.ndarray:
    """Token ids for the parity runs: text from the first 10,000 tokens of the book (the d2l
    training text) for a Time Machine model (random ids or unseen text drive a
    trained model far from its data, where the two GRU kernels' float32 rounding is amplified
    chaotically); for a model with a tokenizer of its own, the book's text through that
    tokenizer (text, not noise, for a model trained on English); random ids for any other
    vocabulary, or where the tokenizer cannot encode enough of the book."""
    length = PROMPT_LEN + CHAINED_STEPS
    corpus = Corpus.time_machine()
    if meta.vocab == corpus.vocab.tokens:
        return np.array([corpus.ids[r * 1400 : r * 1400 + length] for r in range(batch)], dtype=np.int64)
    if meta.tokenizer.get("kind") in ("words", "huggingface"):
        ids = book_ids(meta)
        if ids is not None and len(ids) >= batch * 1400 + length:
            return np.array([ids[r * 1400 : r * 1400 + length] for r in range(batch)], dtype=np.int64)
    return np.random.default_rng(batch).integers(0, meta.vocab_size, (batch, length), dtype=np.int64)


def book_ids(meta: ModelMetadata) -> list[int] | None:
    """The first 100,000 characters of the Time Machine through the model's own tokenizer."""
    from exporters.corpus import time_machine_path
    from exporters.tokenizer import Tokenizer, TokenizerError

    try:
        tok = Tokenizer(dict(meta.tokenizer), meta.vocab, meta.tokenizer_json, "the model's tokenizer")
        return tok.encode(time_machine_path().read_text(encoding="utf-8")[:100_000])
    except TokenizerError:
        return None


def compare_runs(
    test: StepFn, ref: StepFn, meta: ModelMetadata, atol_logits: float, atol_state: float, what: str
) -> dict[str, float]:
    """Max abs differences of logits and state_out over the chained run, at each batch size."""
    worst = {LOGITS: 0.0, STATE_OUT: 0.0}
    for batch in PARITY_BATCHES:
        ids = parity_inputs(meta, batch)
        state = np.zeros((batch, meta.num_layers, meta.hidden_size), dtype=np.float32)
        got = chained_run(test, ids, state, PROMPT_LEN)
        want = chained_run(ref, ids, state, PROMPT_LEN)
        for i, ((gl, gs), (wl, ws)) in enumerate(zip(got, want, strict=True)):
            for name, g, w, atol in ((LOGITS, gl, wl, atol_logits), (STATE_OUT, gs, ws, atol_state)):
                if g.shape != w.shape:
                    raise ToleranceExceeded(
                        name, float("inf"), atol, f"(shape {g.shape} vs {w.shape} at batch {batch})"
                    )
                diff = float(np.max(np.abs(g - w)))
                worst[name] = max(worst[name], diff)
                if not diff <= atol:
                    where = "in the prompt prefill" if i == 0 else f"at chained step {i}"
                    raise ToleranceExceeded(name, diff, atol, f"{where}, batch {batch}, vs {what}")
    return worst


def self_consistency(
    step: StepFn, meta: ModelMetadata, atol_logits: float, atol_state: float
) -> dict[str, float]:
    """Without reference weights: chained calls must agree with a single prefill of the same
    tokens, at every batch size."""
    worst = {LOGITS: 0.0, STATE_OUT: 0.0}
    for batch in PARITY_BATCHES:
        ids = parity_inputs(meta, batch)
        state = np.zeros((batch, meta.num_layers, meta.hidden_size), dtype=np.float32)
        runs = chained_run(step, ids, state, PROMPT_LEN)
        chained_logits = np.concatenate([lg for lg, _ in runs], axis=1)
        whole_logits, whole_state = step(ids, state)
        for name, g, w, atol in (
            (LOGITS, chained_logits, whole_logits, atol_logits),
            (STATE_OUT, runs[-1][1], whole_state, atol_state),
        ):
            diff = float(np.max(np.abs(g - w))) if g.shape == w.shape else float("inf")
            worst[name] = max(worst[name], diff)
            if not diff <= atol:
                raise ToleranceExceeded(
                    name, diff, atol, f"between chained calls and one prefill at batch {batch}"
                )
    return worst


def validate(
    path: Path,
    checkpoint: Checkpoint | None = None,
    atol_logits: float = 1e-4,
    atol_state: float = 1e-5,
    ppl_rtol: float = 1e-4,
    ppl_tokens: list[int] | None = None,
) -> ValidationReport:
    model = load_graph(path)
    report = ValidationReport(path, read_metadata(model))
    meta = report.metadata
    report.checks.append("onnx.checker: ok")
    report.checks.append(
        f"I/O contract and metadata: ok (vocab {meta.vocab_size}, "
        f"layers {meta.num_layers}, hidden {meta.hidden_size})"
    )
    report.checks.append(f"GRU nodes: {len(list(gru_nodes(model.graph)))}, all linear_before_reset=1")
    try:
        step = ort_step(path)
    except Exception as e:
        raise GraphError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from e

    if checkpoint is None:
        report.worst = self_consistency(step, meta, atol_logits, atol_state)
        report.checks.append(
            f"chained calls at batch {' and '.join(map(str, PARITY_BATCHES))} agree with one "
            f"prefill of the same text: max |diff| logits {report.worst[LOGITS]:.2e}, state_out "
            f"{report.worst[STATE_OUT]:.2e} (no checkpoint given: PyTorch parity not checked)"
        )
        return report

    ck = checkpoint.config
    if (ck.vocab_size, ck.num_layers, ck.hidden_size) != (meta.vocab_size, meta.num_layers, meta.hidden_size):
        raise ContractMismatch(
            f"checkpoint is vocab {ck.vocab_size}, layers {ck.num_layers}, hidden {ck.hidden_size}"
            f" but the model is vocab {meta.vocab_size}, layers {meta.num_layers}, "
            f"hidden {meta.hidden_size}"
        )
    if checkpoint.vocab is not None and tuple(checkpoint.vocab.tokens) != meta.vocab:
        raise ContractMismatch("metadata 'gru_serve.vocab' differs from the checkpoint's vocabulary")
    if checkpoint.tokenizer is not None and checkpoint.tokenizer.metadata() != (
        meta.tokenizer,
        meta.tokenizer_json,
    ):
        raise ContractMismatch("metadata 'gru_serve.tokenizer' differs from the checkpoint's tokenizer")
    ref = torch_step(checkpoint)
    report.worst = compare_runs(step, ref, meta, atol_logits, atol_state, "PyTorch")
    report.checks.append(
        f"parity with PyTorch, prefill {PROMPT_LEN} + {CHAINED_STEPS} chained steps at batch "
        f"{' and '.join(map(str, PARITY_BATCHES))}: max |diff| logits "
        f"{report.worst[LOGITS]:.2e} (atol {atol_logits:g}), state_out "
        f"{report.worst[STATE_OUT]:.2e} (atol {atol_state:g})"
    )
    if ppl_tokens:
        shape = (meta.num_layers, meta.hidden_size)
        ours, theirs = d2l_perplexity(step, ppl_tokens, shape), d2l_perplexity(ref, ppl_tokens, shape)
        report.perplexity = {"onnxruntime": ours, "pytorch": theirs}
        if not abs(ours - theirs) <= ppl_rtol * theirs:
            raise PerplexityMismatch(
                f"perplexity {ours:.6f} with onnxruntime vs {theirs:.6f} with PyTorch (rtol {ppl_rtol:g})"
            )
        report.checks.append(
            f"perplexity on {len(ppl_tokens):,} tokens: onnxruntime {ours:.6f}, "
            f"PyTorch {theirs:.6f} (rtol {ppl_rtol:g})"
        )
    return report
