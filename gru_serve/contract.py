"""The model contract between `exporters/` (writes ONNX) and `gru_serve/` (serves it).

Names, axes and metadata keys are defined here once. This module needs no torch, so the
serving runtime reads the same definitions the exporter writes with.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

FORMAT_VERSION = 1
OPSET = 17

INPUT_IDS = "input_ids"
STATE = "state"
LOGITS = "logits"
STATE_OUT = "state_out"
BATCH_AXIS = "batch"
SEQ_AXIS = "seq"

# name -> (ONNX elem type name, symbolic shape); ints are filled from metadata.
INPUTS = {
    INPUT_IDS: ("int64", (BATCH_AXIS, SEQ_AXIS)),
    STATE: ("float32", (BATCH_AXIS, "layers", "hidden")),
}
OUTPUTS = {
    LOGITS: ("float32", (BATCH_AXIS, SEQ_AXIS, "vocab")),
    STATE_OUT: ("float32", (BATCH_AXIS, "layers", "hidden")),
}

# d2l's preprocessing (d2l.ai §8.2): lower-case, every run of non-letters becomes one space.
D2L_NORMALIZATION = {"lowercase": True, "pattern": "[^a-z]+", "replacement": " "}
# Models with a tokenizer of their own: the tokenizer normalises, the contract does not.
IDENTITY_NORMALIZATION = {"lowercase": False, "pattern": "(?!)", "replacement": ""}

# gru_serve.tokenizer: how text becomes ids. Absent: "chars" (d2l's models).
# - {"kind": "chars"}: one id per character of the normalised text (`normalization`);
#   a character outside the vocabulary is <unk> if the vocabulary has one, else refused.
# - {"kind": "words", "split": "whitespace" | "chars", "eos": "<eos>" | null,
#    "unk": "<unk>" | null}: PyTorch word_language_model's convention: each line is split
#   (on whitespace, or into characters) and `eos` ends it; decoding joins words with a space
#   (nothing for chars) and writes `eos` as a newline.
# - {"kind": "huggingface", "sha256": HEX}: a Hugging Face `tokenizers` tokenizer.json (BPE,
#   byte-level or not, WordPiece, Unigram, WordLevel) held whole in gru_serve.tokenizer_json,
#   whose SHA-256 this states.
TOKENIZER_KINDS = ("chars", "words", "huggingface")
# gru_serve.input: how the graph reads ids: "one_hot" (d2l) or "embedding" (a Gather).
INPUT_KINDS = ("one_hot", "embedding")


class ContractError(ValueError):
    """A model file does not honour the contract; the message names the field."""


@dataclass(frozen=True)
class ModelMetadata:
    """What a server needs to know about a model, stored in the ONNX metadata_props."""

    name: str
    vocab: tuple[str, ...]
    hidden_size: int
    num_layers: int
    normalization: dict[str, Any] = field(default_factory=lambda: dict(D2L_NORMALIZATION))
    format_version: int = FORMAT_VERSION
    corpus_sha1: str = ""
    perplexity: dict[str, float] = field(default_factory=dict)
    description: str = ""
    tokenizer: dict[str, Any] = field(default_factory=lambda: {"kind": "chars"})
    tokenizer_json: str = ""  # kind "huggingface": the tokenizer.json text
    input_kind: str = "one_hot"

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def to_props(self) -> dict[str, str]:
        """Flatten into ONNX metadata_props (string -> string)."""
        d = asdict(self)
        props = {
            "gru_serve.format_version": str(self.format_version),
            "gru_serve.name": self.name,
            "gru_serve.vocab": json.dumps(list(self.vocab)),
            "gru_serve.vocab_size": str(self.vocab_size),
            "gru_serve.hidden_size": str(self.hidden_size),
            "gru_serve.num_layers": str(self.num_layers),
            "gru_serve.normalization": json.dumps(d["normalization"], sort_keys=True),
            "gru_serve.corpus_sha1": self.corpus_sha1,
            "gru_serve.perplexity": json.dumps(self.perplexity, sort_keys=True),
            "gru_serve.description": self.description,
            "gru_serve.tokenizer": json.dumps(self.tokenizer, sort_keys=True),
            "gru_serve.input": self.input_kind,
        }
        if self.tokenizer_json:
            props["gru_serve.tokenizer_json"] = self.tokenizer_json
        return props

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ModelMetadata:
        """Parse metadata_props; a missing or malformed field raises ContractError naming it."""

        def get(key: str) -> str:
            full = f"gru_serve.{key}"
            if full not in props:
                raise ContractError(f"model metadata is missing '{full}'")
            return props[full]

        def as_json(key: str, kind: type) -> Any:
            try:
                value = json.loads(get(key))
            except json.JSONDecodeError as e:
                raise ContractError(f"model metadata 'gru_serve.{key}' is not JSON: {e}") from e
            if not isinstance(value, kind):
                raise ContractError(f"model metadata 'gru_serve.{key}' must be a {kind.__name__}")
            return value

        def as_int(key: str) -> int:
            try:
                return int(get(key))
            except ValueError as e:
                raise ContractError(f"model metadata 'gru_serve.{key}' is not an integer") from e

        version = as_int("format_version")
        if version != FORMAT_VERSION:
            raise ContractError(
                f"model metadata 'gru_serve.format_version' is {version}; "
                f"this gru-serve reads version {FORMAT_VERSION}"
            )
        vocab = as_json("vocab", list)
        if not vocab or not all(isinstance(t, str) for t in vocab) or len(set(vocab)) != len(vocab):
            raise ContractError("model metadata 'gru_serve.vocab' must be distinct strings")
        if as_int("vocab_size") != len(vocab):
            raise ContractError(
                f"model metadata 'gru_serve.vocab_size' is {as_int('vocab_size')} "
                f"but 'gru_serve.vocab' has {len(vocab)} tokens"
            )
        norm = as_json("normalization", dict)
        if set(norm) != set(D2L_NORMALIZATION):
            raise ContractError(
                f"model metadata 'gru_serve.normalization' must have keys {sorted(D2L_NORMALIZATION)}"
            )
        tokenizer = json.loads(props.get("gru_serve.tokenizer", '{"kind": "chars"}'))
        tokenizer_json = props.get("gru_serve.tokenizer_json", "")
        check_tokenizer(tokenizer, tokenizer_json, vocab)
        input_kind = props.get("gru_serve.input", "one_hot")
        if input_kind not in INPUT_KINDS:
            raise ContractError(
                f"model metadata 'gru_serve.input' must be one of {INPUT_KINDS}, got {input_kind!r}"
            )
        return cls(
            name=get("name"),
            vocab=tuple(vocab),
            hidden_size=as_int("hidden_size"),
            num_layers=as_int("num_layers"),
            normalization=norm,
            format_version=version,
            corpus_sha1=props.get("gru_serve.corpus_sha1", ""),
            perplexity=as_json("perplexity", dict),
            description=props.get("gru_serve.description", ""),
            tokenizer=tokenizer,
            tokenizer_json=tokenizer_json,
            input_kind=input_kind,
        )

    def expected_shapes(self) -> dict[str, tuple[str, tuple[str | int, ...]]]:
        """The contract's tensors with this model's sizes filled in."""
        sizes = {"layers": self.num_layers, "hidden": self.hidden_size, "vocab": self.vocab_size}
        return {
            name: (dtype, tuple(sizes.get(d, d) for d in shape))
            for name, (dtype, shape) in {**INPUTS, **OUTPUTS}.items()
        }


def check_tokenizer(tokenizer: Any, tokenizer_json: str, vocab: list[str]) -> None:
    """gru_serve.tokenizer (and tokenizer_json) as TOKENIZER_KINDS describes them."""
    where = "model metadata 'gru_serve.tokenizer'"
    if not isinstance(tokenizer, dict) or tokenizer.get("kind") not in TOKENIZER_KINDS:
        raise ContractError(f"{where} must be an object whose kind is one of {TOKENIZER_KINDS}")
    if tokenizer["kind"] == "words":
        if tokenizer.get("split") not in ("whitespace", "chars"):
            raise ContractError(f"{where}: split must be 'whitespace' or 'chars'")
        for key in ("eos", "unk"):
            token = tokenizer.get(key)
            if token is not None and token not in vocab:
                raise ContractError(f"{where}: {key} {token!r} is not in the vocabulary")
    if tokenizer["kind"] == "huggingface":
        digest = hashlib.sha256(tokenizer_json.encode()).hexdigest()
        if not tokenizer_json or tokenizer.get("sha256") != digest:
            raise ContractError(
                "model metadata 'gru_serve.tokenizer_json' is missing or does not match the SHA-256 "
                "in 'gru_serve.tokenizer'"
            )


def check_graph_io(actual: dict[str, tuple[str, tuple[str | int | None, ...]]], meta: ModelMetadata) -> None:
    """Check a graph's tensors (name -> (dtype, shape)) against the contract and metadata.

    Symbolic axes (batch, seq) must be dynamic: any non-integer dim is accepted there, and a
    fixed integer is rejected, because one exporter path silently pins the batch axis.
    """
    for name, (dtype, shape) in meta.expected_shapes().items():
        if name not in actual:
            raise ContractError(f"graph has no tensor '{name}' (found {sorted(actual)})")
        got_dtype, got_shape = actual[name]
        if got_dtype != dtype:
            raise ContractError(f"'{name}' has dtype {got_dtype}, the contract says {dtype}")
        if len(got_shape) != len(shape):
            raise ContractError(f"'{name}' has rank {len(got_shape)}, the contract says {len(shape)}")
        for axis, (want, got) in enumerate(zip(shape, got_shape, strict=True)):
            if isinstance(want, int):
                if got != want:
                    raise ContractError(f"'{name}' axis {axis} is {got}, metadata says {want}")
            elif isinstance(got, int):
                raise ContractError(f"'{name}' axis {axis} ({want}) is fixed to {got}; it must be dynamic")


class LinearBeforeResetError(ContractError):
    pass


def graph_io(model: onnx.ModelProto) -> dict[str, tuple[str, tuple[str | int | None, ...]]]:
    """name -> (numpy dtype name, dims) for the graph's inputs and outputs."""
    out = {}
    for v in [*model.graph.input, *model.graph.output]:
        t = v.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "?"
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
        out[v.name] = (dtype, dims)
    return out


def gru_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every GRU node, including those inside Loop/If/Scan bodies."""
    for node in graph.node:
        if node.op_type == "GRU":
            yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from gru_nodes(attr.g)


def check_linear_before_reset(model: onnx.ModelProto) -> int:
    """Reject GRU nodes that do not compute PyTorch's GRU; returns how many there are."""
    nodes = list(gru_nodes(model.graph))
    for node in nodes:
        lbr = next((a.i for a in node.attribute if a.name == "linear_before_reset"), 0)
        if lbr != 1:
            raise LinearBeforeResetError(
                f"GRU node '{node.name or '?'}' has linear_before_reset={lbr}: PyTorch's GRU "
                "applies the reset gate after the hidden-state matmul (linear_before_reset=1); "
                "with 0 the graph computes a different function and gives silently wrong numbers"
            )
    return len(nodes)


def read_model(model: onnx.ModelProto) -> ModelMetadata:
    """Metadata of a model, checked against its graph and the contract."""
    meta = ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
    check_graph_io(graph_io(model), meta)
    check_linear_before_reset(model)
    return meta
