import torch

from exporters.cli import main
from exporters.model import load_checkpoint
from exporters.train import TrainConfig, train


def test_training_is_deterministic_and_learns(corpus):
    cfg = TrainConfig(hidden_size=32, epochs=3, max_tokens=3000)
    a, b = train(cfg, corpus, show_progress=False), train(cfg, corpus, show_progress=False)
    for k, v in a.checkpoint.model.state_dict().items():
        assert torch.equal(v, b.checkpoint.model.state_dict()[k])
    assert a.metrics["train_d2l"] < 28  # better than uniform over the vocabulary


def test_train_cli_prints_summary_and_saves_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "ck.pt"
    argv = [
        "train",
        "--hidden-size",
        "16",
        "--epochs",
        "2",
        "--max-tokens",
        "2000",
        "--holdout",
        "0.1",
        "--eval-every",
        "1",
        "-o",
        str(out),
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "tokens/s" in text and "held-out" in text
    assert "time traveller" in text and "\n  traveller" in text
    ck = load_checkpoint(out)
    assert ck.model.config.hidden_size == 16
    assert ck.info["recipe"]["holdout"] == 0.1 and len(ck.vocab) == 28
