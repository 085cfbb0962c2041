"""Raw exporter checkpoints with random weights."""

import torch

from exporters.model import GRULanguageModel, ModelConfig


def random_state_dict(vocab_size: int = 28, hidden: int = 256, layers: int = 1, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return GRULanguageModel(ModelConfig(vocab_size, hidden, layers)).state_dict()
