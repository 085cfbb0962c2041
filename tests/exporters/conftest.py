from pathlib import Path

import pytest
import torch

from exporters.corpus import Corpus
from exporters.model import GRULanguageModel, ModelConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def corpus() -> Corpus:
    return Corpus.time_machine()


def random_state_dict(vocab_size: int = 28, hidden: int = 256, layers: int = 1, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return GRULanguageModel(ModelConfig(vocab_size, hidden, layers)).state_dict()


@pytest.fixture
def d2l_state_dict_file(tmp_path: Path) -> Path:
    """A raw d2l-style checkpoint, as `torch.save(net.state_dict(), path)` writes it."""
    path = tmp_path / "d2l.params"
    torch.save(random_state_dict(), path)
    return path
