from pathlib import Path

import pytest
import torch

from exporters.corpus import Corpus
from tests.support.checkpoints import random_state_dict


@pytest.fixture(scope="session")
def corpus() -> Corpus:
    return Corpus.time_machine()


@pytest.fixture
def d2l_state_dict_file(tmp_path: Path) -> Path:
    """A raw d2l-style checkpoint, as `torch.save(net.state_dict(), path)` writes it."""
    path = tmp_path / "d2l.params"
    torch.save(random_state_dict(), path)
    return path
