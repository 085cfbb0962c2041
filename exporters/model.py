"""The GRU language model, equal to d2l's RNNModel (one-hot -> nn.GRU -> Linear), and its
checkpoints: our own (config and vocabulary inside) and d2l-style raw state_dicts."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from exporters.embedding import (
    ContractAdapter,
    EmbeddingConfig,
    EmbeddingGRULM,
    ModuleSpec,
    NotSupported,
    canonical_module,
    embedding_config_from_state_dict,
    inspect_module,
    only_gru,
    recurrent_kind,
)
from exporters.tokenizer import Tokenizer
from gru_serve.contract import D2L_NORMALIZATION
from gru_serve.tokenizer import CharTokenizer

CHECKPOINT_FORMAT = "gru-serve-checkpoint/1"  # d2l one-hot models
EMBEDDING_CHECKPOINT_FORMAT = "gru-serve-checkpoint/2"  # EmbeddingGRULM with its tokenizer


class CheckpointError(ValueError):
    pass


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 28
    hidden_size: int = 256
    num_layers: int = 1
    dropout: float = 0.0  # between GRU layers and before the head; training only


class GRULanguageModel(nn.Module):
    """d2l's RNNModel with nn.GRU: time-major inputs, state [layers, batch, hidden]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.rnn = nn.GRU(
            config.vocab_size,
            config.hidden_size,
            config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(config.dropout)  # no parameters: state_dicts stay d2l's
        self.linear = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, inputs: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs [batch, steps] -> logits [steps * batch, vocab] (d2l's layout), new state."""
        x = F.one_hot(inputs.T.long(), self.config.vocab_size).float()
        y, state = self.rnn(x, state)
        return self.linear(self.drop(y).reshape(-1, y.shape[-1])), state

    def begin_state(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(self.config.num_layers, batch_size, self.config.hidden_size)


class StatefulLM(nn.Module):
    """The exported contract: batch-first ids and state in, logits at every position and the
    final state out (gru_serve.contract)."""

    def __init__(self, model: GRULanguageModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        x = F.one_hot(input_ids.transpose(0, 1), m.config.vocab_size).to(m.linear.weight.dtype)
        y, h = m.rnn(x, state.transpose(0, 1).contiguous())
        return m.linear(y).transpose(0, 1), h.transpose(0, 1)


@dataclass
class Checkpoint:
    """A model to export or validate against: d2l's one-hot GRULanguageModel (`io` None), or
    any GRU LM module with the way its forward is called (`io`) and its tokenizer."""

    model: nn.Module
    vocab: CharTokenizer | None  # id -> token (None: not known; export needs --tokenizer)
    info: dict[str, Any]  # training recipe and measured metrics, if known
    tokenizer: Tokenizer | None = None  # None: d2l's characters (vocab and its normalisation)
    io: ModuleSpec | None = None  # None: GRULanguageModel
    source: str = ""  # what was loaded, in words

    @property
    def config(self) -> ModelConfig:
        """Sizes (vocab, hidden, layers) as a ModelConfig, for every kind of model."""
        if self.io is None:
            return self.model.config
        dropout = getattr(getattr(self.model, "config", None), "dropout", 0.0)
        return ModelConfig(self.io.vocab_size, self.io.hidden_size, self.io.num_layers, dropout)

    def reference(self) -> nn.Module:
        """The contract computed by the model's own forward (what validation compares with)."""
        wrapped = StatefulLM(self.model) if self.io is None else ContractAdapter(self.model, self.io)
        return wrapped.eval()

    def exportable(self) -> tuple[nn.Module, str]:
        """The module to export and what it is: d2l's StatefulLM, EmbeddingStateful where the
        model is an embedding -> GRU -> linear head, else the reference (traced as is)."""
        if self.io is None:
            return StatefulLM(self.model).eval(), "one-hot"
        canonical = canonical_module(self.model.eval(), self.io)
        if canonical is not None:
            return canonical, "embedding"
        return self.reference(), "traced"

    def with_tokenizer(self, tokenizer: Tokenizer) -> Checkpoint:
        """This model with another tokenizer, whose size must be the model's."""
        check_tokenizer_size(tokenizer, self)
        return replace(self, tokenizer=tokenizer, vocab=tokenizer.vocabulary())

    def save(self, path: Path) -> None:
        if self.io is None:
            torch.save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "config": asdict(self.model.config),
                    "vocab": list(self.vocab.tokens),
                    "normalization": self.vocab.normalization,
                    "state_dict": self.model.state_dict(),
                    "info": json.dumps(self.info),
                },
                path,
            )
            return
        if not isinstance(self.model, EmbeddingGRULM) or self.tokenizer is None:
            raise CheckpointError("only an EmbeddingGRULM with its tokenizer can be saved as a checkpoint")
        torch.save(
            {
                "format": EMBEDDING_CHECKPOINT_FORMAT,
                "config": asdict(self.model.config),
                "tokenizer": self.tokenizer.to_dict(),
                "state_dict": self.model.state_dict(),
                "info": json.dumps(self.info),
            },
            path,
        )


def check_tokenizer_size(tokenizer: Tokenizer, checkpoint: Checkpoint) -> None:
    """The tokenizer must have exactly as many tokens as the model's embedding (and output)."""
    io = checkpoint.io
    rows = io.embedding_rows if io and io.embedding_rows else checkpoint.config.vocab_size
    what = "embedding has" if io and io.embedding_rows else "input and output have"
    if len(tokenizer) != rows or len(tokenizer) != checkpoint.config.vocab_size:
        out = "" if rows == checkpoint.config.vocab_size else f" (and {checkpoint.config.vocab_size} outputs)"
        raise CheckpointError(
            f"tokenizer {tokenizer.source or '(given)'} has {len(tokenizer):,} tokens but the model's "
            f"{what} {rows:,}{out}: give the tokenizer the model was trained with"
        )


_GRU_KEY = re.compile(r"rnn\.(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)$")


def config_from_state_dict(sd: dict[str, Any]) -> ModelConfig:
    """Infer sizes from a d2l-style state_dict, or say what is wrong with it."""
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError("not a state_dict of tensors")
    kind = recurrent_kind(sd)
    if kind and kind != "GRU":
        raise CheckpointError(str(only_gru(kind, "this state_dict")))
    layers = sorted({int(m.group(2)) for k in sd if (m := _GRU_KEY.match(k))})
    required = ["linear.weight", "linear.bias"] + [
        f"rnn.{p}_l{i}"
        for i in range(max(layers, default=0) + 1)
        for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    ]
    missing = [k for k in required if k not in sd]
    if not layers or missing:
        raise CheckpointError(
            "not a GRU language model state_dict: missing "
            + ", ".join(missing or ["rnn.weight_ih_l0", "..."])
        )
    unexpected = sorted(set(sd) - set(required))
    if unexpected:
        raise CheckpointError(f"not a GRU language model state_dict: unexpected keys {unexpected}")
    three_h, vocab_size = sd["rnn.weight_ih_l0"].shape
    if three_h % 3:
        raise CheckpointError("rnn.weight_ih_l0 has a first axis that is not 3 x hidden: not a GRU")
    config = ModelConfig(vocab_size=vocab_size, hidden_size=three_h // 3, num_layers=len(layers))
    expected = GRULanguageModel(config).state_dict()
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)} for "
                f"vocab {vocab_size}, hidden {config.hidden_size}, layers {config.num_layers}"
            )
    return config


def read_vocab_file(path: Path) -> CharTokenizer:
    """A vocabulary file: one token per line, in id order (a line '<space>' stands for ' ')."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise CheckpointError(f"cannot read vocabulary {path}: {e.strerror}") from e
    tokens = tuple(" " if t == "<space>" else t for t in lines if t != "")
    return CharTokenizer(tokens, dict(D2L_NORMALIZATION))


_PICKLED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _read(path: Path, trust_pickle: bool, pythonpath: tuple[Path, ...]) -> Any:
    """torch.load with weights_only=True; a file that needs code to unpickle (a whole module
    saved with torch.save(model, f)) is loaded only with trust_pickle."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path} does not exist") from e
    except IsADirectoryError as e:
        raise CheckpointError(f"checkpoint {path} is a directory") from e
    except Exception as e:  # torch raises many kinds for a corrupt file
        pickled = _PICKLED_GLOBAL.search(str(e))
        if not pickled:
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({type(e).__name__}): "
                f"{str(e).splitlines()[0] if str(e) else 'corrupt file'}"
            ) from e
        if not trust_pickle:
            raise CheckpointError(
                f"checkpoint {path} is a Python pickle ({pickled.group(1)}, e.g. a whole module saved "
                "with torch.save(model, f)); loading it runs code from the file: pass --trust-pickle "
                "if you trust it"
            ) from None
    added = [str(Path(p).resolve()) for p in pythonpath]
    sys.path[:0] = added
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as e:
        missing = getattr(e, "name", None) or str(e).splitlines()[0]
        raise CheckpointError(
            f"checkpoint {path} is a pickle of a class from module {missing!r}, which cannot be imported "
            "here: put the directory holding its source on PYTHONPATH or pass --pythonpath DIR"
        ) from e
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} cannot be unpickled ({type(e).__name__}): "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    finally:
        for p in added:
            sys.path.remove(p)


def module_checkpoint(
    module: nn.Module,
    tokenizer: Tokenizer | None = None,
    time_major: bool | None = None,
    info: dict[str, Any] | None = None,
    source: str = "",
) -> Checkpoint:
    """A Checkpoint for any GRU LM module whose forward takes (ids, state [layers, batch,
    hidden]) and returns (scores, new state); time_major None: its nn.GRU's batch_first."""
    try:
        spec = inspect_module(module, time_major)
    except NotSupported as e:
        raise CheckpointError(str(e)) from e
    ck = Checkpoint(module.eval(), None, info or {}, None, spec, source or type(module).__name__)
    return ck.with_tokenizer(tokenizer) if tokenizer is not None else ck


def load_checkpoint(
    path: Path,
    vocab_file: Path | None = None,
    *,
    tokenizer: Tokenizer | None = None,
    trust_pickle: bool = False,
    time_major: bool | None = None,
    pythonpath: tuple[Path, ...] = (),
) -> Checkpoint:
    """Load a model: our checkpoints (d2l one-hot, or embedding with its tokenizer), a
    d2l-style or word_language_model-layout `torch.save(model.state_dict(), path)` file, or (with
    trust_pickle) a whole module saved with `torch.save(model, path)`. `tokenizer` replaces
    or supplies the vocabulary; `vocab_file` is d2l's one-character-per-line vocabulary."""
    from exporters.corpus import Corpus  # the default vocabulary for raw state_dicts

    path = Path(path)
    obj = _read(path, trust_pickle, tuple(pythonpath))
    if vocab_file and tokenizer:
        raise CheckpointError("give either --vocab (d2l characters) or --tokenizer, not both")
    if isinstance(obj, nn.Module):
        return module_checkpoint(
            obj, tokenizer, time_major, source=f"{type(obj).__module__}.{type(obj).__name__}"
        )
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a model or a state_dict")
    if obj.get("format") == EMBEDDING_CHECKPOINT_FORMAT:
        if vocab_file:
            raise CheckpointError(f"{path} has a tokenizer of its own; --vocab is for d2l character models")
        model = EmbeddingGRULM(EmbeddingConfig(**obj["config"]))
        model.load_state_dict(obj["state_dict"])
        info = json.loads(obj.get("info") or "{}")
        own = Tokenizer.from_dict(obj["tokenizer"], f"{path}'s tokenizer")
        return module_checkpoint(model, tokenizer or own, True, info, "gru-export train checkpoint")
    info: dict[str, Any] = {}
    if obj.get("format") == CHECKPOINT_FORMAT:
        config = ModelConfig(**obj["config"])
        config_from_state_dict(obj["state_dict"])  # same shape checks as a raw file
        sd = obj["state_dict"]
        vocab = CharTokenizer(tuple(obj["vocab"]), dict(obj["normalization"]))
        info = json.loads(obj.get("info") or "{}")
    elif "encoder.weight" in obj:
        if vocab_file:
            raise CheckpointError("--vocab is for d2l character models; give this model's --tokenizer")
        try:
            config_e = embedding_config_from_state_dict(obj, log_softmax=True)
        except NotSupported as e:
            raise CheckpointError(str(e)) from e
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e
        model = EmbeddingGRULM(config_e)
        model.load_state_dict(obj)
        return module_checkpoint(model, tokenizer, True, source="word_language_model state_dict")
    else:
        sd = obj
        config = config_from_state_dict(sd)
        vocab = read_vocab_file(vocab_file) if vocab_file else Corpus.time_machine().vocab
    if vocab_file and obj.get("format") == CHECKPOINT_FORMAT:
        vocab = read_vocab_file(vocab_file)
    model = GRULanguageModel(config)
    model.load_state_dict(sd)
    model.eval()
    if tokenizer is not None:
        return Checkpoint(model, vocab, info).with_tokenizer(tokenizer)
    if len(vocab) != config.vocab_size:
        where = f"vocabulary file {vocab_file}" if vocab_file else "the Time Machine vocabulary"
        raise CheckpointError(
            f"{path}: the model has vocab size {config.vocab_size} but {where} has "
            f"{len(vocab)} tokens (give the model's vocabulary with --vocab FILE)"
        )
    return Checkpoint(model, vocab, info)


def contract_step(module: nn.Module):
    """The contract's step function (numpy in and out) computed by a contract module."""
    module = module.eval()

    def step(ids, state):
        with torch.no_grad():
            logits, out = module(torch.from_numpy(ids), torch.from_numpy(state))
        return logits.numpy(), out.numpy()

    return step


def torch_step(model: GRULanguageModel | Checkpoint):
    """The contract's step function (numpy in and out) computed by PyTorch: d2l's model, or a
    checkpoint's reference (its module's own forward)."""
    return contract_step(model.reference() if isinstance(model, Checkpoint) else StatefulLM(model))


def greedy_continue(model: GRULanguageModel, vocab: CharTokenizer, prefix: str, num_preds: int = 50) -> str:
    """d2l's predict_ch8: warm up on the prefix, then take the argmax num_preds times."""
    ids = vocab.encode(prefix)
    state = model.begin_state(1)
    with torch.no_grad():
        logits, state = model(torch.tensor([ids]), state)
        out = list(ids)
        for _ in range(num_preds):
            out.append(int(logits[-1].argmax()))
            logits, state = model(torch.tensor([[out[-1]]]), state)
    return vocab.decode(out)
