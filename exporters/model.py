"""The GRU language model, equal to d2l's RNNModel (one-hot -> nn.GRU -> Linear), and its
checkpoints: our own (config and vocabulary inside) and d2l-style raw state_dicts."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gru_serve.contract import D2L_NORMALIZATION
from gru_serve.vocab import Vocabulary

CHECKPOINT_FORMAT = "gru-serve-checkpoint/1"


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
    model: GRULanguageModel
    vocab: Vocabulary
    info: dict[str, Any]  # training recipe and measured metrics, if known

    def save(self, path: Path) -> None:
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


_GRU_KEY = re.compile(r"rnn\.(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)$")


def config_from_state_dict(sd: dict[str, Any]) -> ModelConfig:
    """Infer sizes from a d2l-style state_dict, or say what is wrong with it."""
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError("not a state_dict of tensors")
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


def read_vocab_file(path: Path) -> Vocabulary:
    """A vocabulary file: one token per line, in id order (a line '<space>' stands for ' ')."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise CheckpointError(f"cannot read vocabulary {path}: {e.strerror}") from e
    tokens = tuple(" " if t == "<space>" else t for t in lines if t != "")
    return Vocabulary(tokens, dict(D2L_NORMALIZATION))


def load_checkpoint(path: Path, vocab_file: Path | None = None) -> Checkpoint:
    """Load our checkpoint or a d2l-style `torch.save(model.state_dict(), path)` file."""
    from exporters.corpus import Corpus  # the default vocabulary for raw state_dicts

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path} does not exist") from e
    except IsADirectoryError as e:
        raise CheckpointError(f"checkpoint {path} is a directory") from e
    except Exception as e:  # torch raises many kinds for a corrupt file
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}): "
            f"{str(e).splitlines()[0] if str(e) else 'corrupt file'}"
        ) from e
    info: dict[str, Any] = {}
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        config = ModelConfig(**obj["config"])
        config_from_state_dict(obj["state_dict"])  # same shape checks as a raw file
        sd = obj["state_dict"]
        vocab = Vocabulary(tuple(obj["vocab"]), dict(obj["normalization"]))
        info = json.loads(obj.get("info") or "{}")
    else:
        sd = obj
        config = config_from_state_dict(sd)
        vocab = read_vocab_file(vocab_file) if vocab_file else Corpus.time_machine().vocab
    if vocab_file and isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        vocab = read_vocab_file(vocab_file)
    if len(vocab) != config.vocab_size:
        where = f"vocabulary file {vocab_file}" if vocab_file else "the Time Machine vocabulary"
        raise CheckpointError(
            f"{path}: the model has vocab size {config.vocab_size} but {where} has "
            f"{len(vocab)} tokens (give the model's vocabulary with --vocab FILE)"
        )
    model = GRULanguageModel(config)
    model.load_state_dict(sd)
    model.eval()
    return Checkpoint(model, vocab, info)


def torch_step(model: GRULanguageModel):
    """The contract's step function (numpy in and out) computed by PyTorch."""
    wrapped = StatefulLM(model).eval()

    def step(ids, state):
        with torch.no_grad():
            logits, out = wrapped(torch.from_numpy(ids), torch.from_numpy(state))
        return logits.numpy(), out.numpy()

    return step


def greedy_continue(model: GRULanguageModel, vocab: Vocabulary, prefix: str, num_preds: int = 50) -> str:
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
