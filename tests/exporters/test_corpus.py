import random
import shutil

import pytest

from exporters.corpus import (
    TIME_MACHINE_TOKENS,
    CorpusError,
    read_time_machine,
    seq_data_iter_random,
    seq_data_iter_sequential,
    time_machine_path,
)


def test_tokens_and_vocabulary_are_d2l_s(corpus):
    assert len(corpus.ids) == TIME_MACHINE_TOKENS
    assert corpus.vocab.tokens == ("<unk>", " ", *"etainoshrdlmucfwgypbvkxzjq")
    # Lines are joined with no separator, so a line's last word runs into the next line's first.
    text = corpus.vocab.decode(corpus.ids[:62])
    assert text == "the time machine by h g wellsithe time traveller for so it wil"


def test_lines_are_normalised_like_d2l():
    lines = read_time_machine()
    assert lines[0] == "the time machine by h g wells"
    assert all(line == line.strip().lower() and "  " not in line for line in lines)
    assert all(set(line) <= set(" abcdefghijklmnopqrstuvwxyz") for line in lines)


def test_corrupt_corpus_is_refused(tmp_path):
    bad = tmp_path / "timemachine.txt"
    shutil.copy(time_machine_path(), bad)
    bad.write_bytes(bad.read_bytes().replace(b"Time", b"Tame", 1))
    with pytest.raises(CorpusError, match="sha1"):
        read_time_machine(bad)


def test_split_defaults_to_d2l_first_10000_tokens(corpus):
    train, held = corpus.split()
    assert train == corpus.ids[:10_000] and held == []
    train, held = corpus.split(max_tokens=0, holdout=0.1)
    cut = int(0.9 * TIME_MACHINE_TOKENS)
    assert train == corpus.ids[:cut] and held == corpus.ids[cut:]
    with pytest.raises(CorpusError, match="holdout"):
        corpus.split(holdout=1.5)


def test_sequential_iterator_continues_each_row(corpus):
    ids = corpus.ids[:10_000]
    batches = list(seq_data_iter_sequential(ids, 32, 35, random.Random(0), offset=0))
    assert len(batches) == 8 and all(x.shape == (32, 35) for x, _ in batches)
    for x, y in batches:
        assert (x[:, 1:] == y[:, :-1]).all()
    # Row b of minibatch i+1 starts where row b of minibatch i ended.
    first, second = batches[0][0], batches[1][0]
    row = 10_000 // 32 * 32 // 32
    assert first[1, 0].item() == ids[row] and second[0, 0].item() == ids[35]


def test_random_iterator_yields_shifted_pairs(corpus):
    ids = corpus.ids[:10_000]
    batches = list(seq_data_iter_random(ids, 32, 35, random.Random(0)))
    assert len(batches) == (10_000 - 1) // 35 // 32
    for x, y in batches:
        assert x.shape == y.shape == (32, 35)
        assert (x[:, 1:] == y[:, :-1]).all()
