"""PyTorch eager timings for `gru-serve bench` (which never imports torch: it runs this module
in a subprocess and reads the JSON it prints).

    python -m exporters.torch_bench --model MODEL.onnx [--checkpoint CK] [--tokens N] ...

- d2l: d2l.ai's predict_ch8 loop as written (one-hot inside the model, autograd on, one
  token per call, `int(y.argmax(...))` per step), batch 1;
- no_grad: the same loop under torch.no_grad();
- batched: the model's forward on [B, 1] tokens per step with argmax feedback, no_grad, at
  each batch size, with torch's default threads and with one thread.

The weights come from the checkpoint when given, else from the ONNX model itself (the GRU gates
reordered from ONNX's z, r, h to PyTorch's r, z, n), so both sides run the same model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from exporters.model import GRULanguageModel, ModelConfig, load_checkpoint
from gru_serve.contract import read_model
from gru_serve.graphs.weights import gru_weights
from gru_serve.tokenizer import CharTokenizer


def _torch_gates(x: np.ndarray) -> torch.Tensor:
    """ONNX gate order z, r, h -> PyTorch's r, z, n (first axis)."""
    z, r, n = np.split(x, 3)
    return torch.from_numpy(np.concatenate([r, z, n]).copy())


def model_from_onnx(path: Path) -> tuple[GRULanguageModel, CharTokenizer]:
    """The d2l-style PyTorch model with the weights of an exported ONNX model."""
    proto = onnx.load(str(path))
    meta = read_model(proto)
    w = gru_weights(proto)
    model = GRULanguageModel(ModelConfig(meta.vocab_size, meta.hidden_size, meta.num_layers))
    sd = {}
    for i, (wi, ri, wb, rb) in enumerate(w.layers):
        sd[f"rnn.weight_ih_l{i}"] = _torch_gates(wi)
        sd[f"rnn.weight_hh_l{i}"] = _torch_gates(ri)
        sd[f"rnn.bias_ih_l{i}"] = _torch_gates(wb)
        sd[f"rnn.bias_hh_l{i}"] = _torch_gates(rb)
    sd["linear.weight"] = torch.from_numpy(w.head_w.T.copy())
    sd["linear.bias"] = torch.from_numpy(w.head_b.copy())
    model.load_state_dict(sd)
    return model.eval(), CharTokenizer(meta.vocab, meta.normalization)


def load_model(model: Path, checkpoint: Path | None) -> tuple[GRULanguageModel, CharTokenizer]:
    if checkpoint:
        ck = load_checkpoint(checkpoint)
        return ck.model.eval(), ck.vocab
    return model_from_onnx(model)


def predict_ch8(
    prefix: str, num_preds: int, net: GRULanguageModel, vocab: CharTokenizer
) -> tuple[str, float]:
    """d2l.ai's predict_ch8 (0.17), as written; returns the text and seconds per predicted token."""
    state = net.begin_state(batch_size=1)
    outputs = [vocab.encode(prefix[0])[0]]

    def get_input() -> torch.Tensor:
        return torch.tensor([outputs[-1]]).reshape((1, 1))

    for y in vocab.encode(prefix[1:]):  # warm-up period
        _, state = net(get_input(), state)
        outputs.append(y)
    t0 = time.perf_counter()
    for _ in range(num_preds):  # predict num_preds steps
        y, state = net(get_input(), state)
        outputs.append(int(y.argmax(dim=1).reshape(1)))
    seconds = (time.perf_counter() - t0) / num_preds
    return vocab.decode(outputs), seconds


def batched_step_seconds(net: GRULanguageModel, batch: int, steps: int) -> float:
    """Seconds per batched greedy step (one-hot inside the model, argmax feedback), no_grad."""
    state = net.begin_state(batch)
    tok = torch.zeros((batch, 1), dtype=torch.long)
    with torch.no_grad():
        for _ in range(3):
            y, state = net(tok, state)
        t0 = time.perf_counter()
        for _ in range(steps):
            y, state = net(tok, state)
            tok = y.argmax(dim=1).reshape(batch, 1)
    return (time.perf_counter() - t0) / steps


def best(fn, repeats: int) -> float:
    return min(fn() for _ in range(repeats))


def run(args: argparse.Namespace) -> dict:
    net, vocab = load_model(Path(args.model), Path(args.checkpoint) if args.checkpoint else None)
    out: dict = {"torch": torch.__version__, "default_threads": torch.get_num_threads()}
    prefix = "time traveller"
    predict_ch8(prefix, 50, net, vocab)  # warm up
    text, _ = predict_ch8(prefix, 50, net, vocab)
    out["d2l_sample"] = text
    d2l = best(lambda: predict_ch8(prefix, args.tokens, net, vocab)[1], args.repeats)
    with torch.no_grad():
        no_grad = best(lambda: predict_ch8(prefix, args.tokens, net, vocab)[1], args.repeats)
    out["d2l"] = {"us_per_token": d2l * 1e6, "tokens_per_s": 1 / d2l}
    out["no_grad"] = {"us_per_token": no_grad * 1e6, "tokens_per_s": 1 / no_grad}
    batches = [int(b) for b in args.batches.split(",") if b]
    for label, threads in (("batched", out["default_threads"]), ("batched_1_thread", 1)):
        torch.set_num_threads(threads)
        rows = []
        for b in batches:
            steps = max(5, args.batched_tokens // b) if b > 1 else args.tokens
            s = best(lambda b=b, steps=steps: batched_step_seconds(net, b, steps), args.repeats)
            rows.append({"batch": b, "us_per_step": s * 1e6, "tokens_per_s": b / s, "threads": threads})
        out[label] = rows
    torch.set_num_threads(out["default_threads"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m exporters.torch_bench", description=__doc__)
    p.add_argument("--model", required=True, help="the exported ONNX model (weights and vocabulary)")
    p.add_argument("--checkpoint", help="take the weights from this checkpoint instead")
    p.add_argument("--tokens", type=int, default=2000, help="tokens per batch-1 measurement")
    p.add_argument("--batched-tokens", type=int, default=20000, help="tokens per batched measurement")
    p.add_argument("--batches", default="1,8,32,64,256")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    json.dump(run(p.parse_args(argv)), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
