"""The models shipped in gru_serve/models: valid, faithful to their checkpoints, as good as
their cards say."""

from pathlib import Path

import numpy as np
import onnx
import pytest

from exporters.corpus import TIME_MACHINE_SHA1
from exporters.export import evaluation_split
from exporters.model import load_checkpoint
from exporters.validate import ort_step, validate
from gru_serve.contract import read_model
from gru_serve.scoring import d2l_perplexity, stream_perplexity
from gru_serve.shipped import DEFAULT_MODEL, shipped_models
from tests.support.paths import REPO

MODELS = shipped_models()


def test_default_model_is_shipped_first():
    assert next(iter(MODELS)) == DEFAULT_MODEL
    assert {"timemachine-d2l", "timemachine-full"} <= set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shipped_model_validates_against_its_checkpoint(name):
    ck = load_checkpoint(REPO / "checkpoints" / f"{name}.pt")
    report = validate(MODELS[name], ck, ppl_tokens=evaluation_split(ck)[0])
    assert report.metadata.name == name and report.metadata.corpus_sha1 == TIME_MACHINE_SHA1
    card = (MODELS[name].parent / "README.md").read_text()
    for key in ("train_d2l", "train_stream"):
        assert f"{report.metadata.perplexity[key]:.4f}" in card
    assert "gru-export train" in card and TIME_MACHINE_SHA1 in card


def test_d2l_model_memorises_its_training_text(corpus):
    path = MODELS["timemachine-d2l"]
    meta = read_model(onnx.load(str(path)))
    train, _ = corpus.split()
    step, shape = ort_step(path), (meta.num_layers, meta.hidden_size)
    assert d2l_perplexity(step, train, shape) <= 1.2
    assert meta.perplexity["heldout_stream"] > 100  # it memorised; it does not generalise
    # Greedy continuation of "time traveller" is text of the book.
    ids = corpus.vocab.encode("time traveller")
    logits, state = step(np.array([ids]), np.zeros((1, *shape), np.float32))
    out = []
    for _ in range(50):
        out.append(int(logits[0, -1].argmax()))
        logits, state = step(np.array([[out[-1]]]), state)
    book = corpus.vocab.decode(corpus.ids)
    assert "time traveller" + corpus.vocab.decode(out) in book


def test_full_model_generalises_to_the_last_tenth(corpus):
    path = MODELS["timemachine-full"]
    meta = read_model(onnx.load(str(path)))
    _, held = corpus.split(max_tokens=0, holdout=0.1)
    assert len(held) == len(corpus.ids) - int(0.9 * len(corpus.ids))
    ppl = stream_perplexity(ort_step(path), held, (meta.num_layers, meta.hidden_size))
    assert ppl <= 4.5
    assert ppl == pytest.approx(meta.perplexity["heldout_stream"], rel=1e-4)


def test_shipped_files_are_small():
    for path in MODELS.values():
        assert Path(path).stat().st_size < 8_000_000
