"""Export and validation, through the CLI as a user runs them."""

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exporters.cli import main
from exporters.model import Checkpoint, GRULanguageModel, ModelConfig, load_checkpoint
from exporters.validate import ContractMismatch, ToleranceExceeded, validate
from gru_serve.contract import ContractError, LinearBeforeResetError, read_model
from tests.support.checkpoints import random_state_dict


class D2LRNNModel(nn.Module):
    """d2l.ai §9.1's RNNModel, written out independently of exporters.model."""

    def __init__(self, vocab_size: int, num_hiddens: int) -> None:
        super().__init__()
        self.rnn = nn.GRU(vocab_size, num_hiddens)
        self.vocab_size = vocab_size
        self.linear = nn.Linear(num_hiddens, vocab_size)

    def forward(self, inputs, state):
        x = F.one_hot(inputs.T.long(), self.vocab_size).to(torch.float32)
        y, state = self.rnn(x, state)
        return self.linear(y.reshape((-1, y.shape[-1]))), state


def test_d2l_state_dict_exports_and_matches_an_independent_forward(d2l_state_dict_file, tmp_path):
    out = tmp_path / "d2l.onnx"
    assert main(["export", str(d2l_state_dict_file), "-o", str(out)]) == 0

    net = D2LRNNModel(28, 256)
    net.load_state_dict(torch.load(d2l_state_dict_file))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for batch in (1, 7):
        ids = rng.integers(0, 28, (batch, 220))
        state = np.zeros((batch, 1, 256), np.float32)
        h = torch.zeros(1, batch, 256)
        for start, stop in [(0, 20), *((t, t + 1) for t in range(20, 220))]:
            chunk = ids[:, start:stop]
            logits, state = sess.run(None, {"input_ids": chunk, "state": state})
            with torch.no_grad():
                ref, h = net(torch.from_numpy(chunk), h)
            ref = ref.reshape(stop - start, batch, 28).transpose(0, 1).numpy()
            np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
            np.testing.assert_allclose(state, h.transpose(0, 1).numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("layers", "hidden"), [(2, 256), (1, 128), (2, 64)])
def test_other_sizes_export_and_validate(tmp_path, layers, hidden):
    model = GRULanguageModel(ModelConfig(28, hidden, layers))
    model.load_state_dict(random_state_dict(28, hidden, layers))
    raw = tmp_path / "raw.pt"
    torch.save(model.state_dict(), raw)
    out = tmp_path / "m.onnx"
    assert main(["export", str(raw), "-o", str(out)]) == 0
    meta = read_model(onnx.load(str(out)))
    assert (meta.num_layers, meta.hidden_size, meta.vocab_size) == (layers, hidden, 28)
    assert main(["validate", str(out), "--checkpoint", str(raw)]) == 0


@pytest.fixture
def exported(d2l_state_dict_file, tmp_path):
    out = tmp_path / "m.onnx"
    assert main(["export", str(d2l_state_dict_file), "-o", str(out)]) == 0
    return out


def test_linear_before_reset_zero_is_rejected_by_name(exported, tmp_path, capsys):
    graph = onnx.load(str(exported))
    (gru,) = [n for n in graph.graph.node if n.op_type == "GRU"]
    for attr in gru.attribute:
        if attr.name == "linear_before_reset":
            attr.i = 0
    bad = tmp_path / "lbr0.onnx"
    onnx.save(graph, str(bad))
    with pytest.raises(ContractMismatch, match="linear_before_reset=0") as err:
        validate(bad)
    assert isinstance(err.value.__cause__, LinearBeforeResetError)
    assert main(["validate", str(bad)]) == 1
    assert "PyTorch's GRU applies the reset gate" in capsys.readouterr().err


def test_pinned_batch_axis_is_rejected(exported, tmp_path):
    graph = onnx.load(str(exported))
    graph.graph.input[1].type.tensor_type.shape.dim[0].dim_value = 2
    bad = tmp_path / "pinned.onnx"
    onnx.save(graph, str(bad))
    with pytest.raises(ContractError, match=r"'state' axis 0 .* must be dynamic"):
        read_model(onnx.load(str(bad)))
    assert main(["validate", str(bad)]) == 1


def test_parity_failure_names_the_output_and_worst_difference(exported, d2l_state_dict_file):
    ck = load_checkpoint(d2l_state_dict_file)
    with torch.no_grad():
        ck.model.linear.bias += 1e-3  # logits move, state does not
    with pytest.raises(ToleranceExceeded, match=r"'logits' differs by up to 0\.001") as err:
        validate(exported, Checkpoint(ck.model, ck.vocab, {}))
    assert err.value.output == "logits"


def test_validate_with_checkpoint_reports_parity_and_perplexity(exported, d2l_state_dict_file, capsys):
    assert main(["validate", str(exported), "--checkpoint", str(d2l_state_dict_file)]) == 0
    out = capsys.readouterr().out
    assert "parity with PyTorch" in out and "perplexity on 10,000 tokens" in out


def test_info_prints_contract_and_metadata(exported, capsys):
    assert main(["info", str(exported)]) == 0
    out = capsys.readouterr().out
    assert "input  input_ids  int64    [batch, seq]" in out
    assert "output state_out  float32  [batch, 1, 256]" in out
    assert "vocab ( 28)" in out


def _one_error_line(capsys, code, argv):
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gru-export: error: "), err
    return err[0]


def test_bad_inputs_give_one_line_and_exit_2(tmp_path, d2l_state_dict_file, capsys):
    out = str(tmp_path / "o.onnx")
    assert "does not exist" in _one_error_line(capsys, 2, ["export", str(tmp_path / "no.pt"), "-o", out])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint" * 10)
    assert "cannot be read" in _one_error_line(capsys, 2, ["export", str(junk), "-o", out])
    wide = tmp_path / "wide.pt"
    torch.save(random_state_dict(vocab_size=30, hidden=32), wide)
    assert "vocab size 30" in _one_error_line(capsys, 2, ["export", str(wide), "-o", out])
    lstm = tmp_path / "lstm.pt"
    torch.save(nn.LSTM(28, 32).state_dict(), lstm)
    assert "not a GRU language model" in _one_error_line(capsys, 2, ["export", str(lstm), "-o", out])
    line = _one_error_line(capsys, 2, ["export", str(d2l_state_dict_file), "-o", "/nonexistent/m.onnx"])
    assert "not writable" in line
    assert "does not exist" in _one_error_line(capsys, 2, ["validate", str(tmp_path / "none.onnx")])


def test_vocab_file_gives_another_vocabulary(tmp_path):
    sd = tmp_path / "sd.pt"
    torch.save(random_state_dict(vocab_size=5, hidden=16), sd)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("<unk>\n<space>\na\nb\nc\n")
    out = tmp_path / "v.onnx"
    assert main(["export", str(sd), "-o", str(out), "--vocab", str(vocab)]) == 0
    assert read_model(onnx.load(str(out))).vocab == ("<unk>", " ", "a", "b", "c")


def test_console_script_reports_errors_without_traceback(tmp_path):
    exe = [sys.executable, "-m", "exporters.cli"]
    r = subprocess.run(
        [*exe, "export", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "x.onnx")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
