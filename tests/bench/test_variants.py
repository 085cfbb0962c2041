"""gru-export variants: the optimized and fp16 variants validate and report their perplexity
change; the fused variant's tokens equal the step path's."""

import json

import numpy as np
import onnx
import pytest

from exporters import variants as variants_mod
from exporters.cli import main as export_main
from exporters.validate import ToleranceExceeded
from gru_serve.contract import read_model
from gru_serve.engine.runtime import ModelRuntime, RuntimeOptions
from tests.support.serving import D2L


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    out = tmp_path_factory.mktemp("variants")
    assert export_main(["variants", str(D2L), "-o", str(out)]) == 0
    return out, json.loads((out / "variants.json").read_text())


def test_every_variant_is_written_and_checked(variants):
    out, rep = variants
    for kind in ("optimized", "fp16", "decode", "fused"):
        assert (out / f"{kind}.onnx").is_file() and rep[kind]["checks"], kind
        props = {p.key: p.value for p in onnx.load(str(out / f"{kind}.onnx")).metadata_props}
        assert props["gru_serve.variant"] == kind and len(props["gru_serve.base_sha256"]) == 64
    assert any("fused = step path" in c and "seeded sampling" in c for c in rep["fused"]["checks"])


def test_optimized_and_fp16_keep_the_contract_and_report_perplexity(variants):
    out, rep = variants
    base = rep["base"]["perplexity"]
    assert set(base) == {"train_d2l", "train_stream", "heldout_stream"} and base["train_d2l"] < 1.2
    for kind in ("optimized", "fp16"):
        read_model(onnx.load(str(out / f"{kind}.onnx")))  # the serving contract holds
        r = rep[kind]
        assert set(r["perplexity_change"]) == set(base)
        for k, change in r["perplexity_change"].items():
            assert change == pytest.approx(r["perplexity"][k] / base[k] - 1)
    assert rep["optimized"]["max_diff"]["logits"] <= 1e-4
    logits_atol, state_atol = variants_mod.FP16_ATOL
    assert 0 < rep["fp16"]["max_diff"]["logits"] <= logits_atol < 0.1 and state_atol < 0.1
    assert any(f"(atol {logits_atol:g})" in c for c in rep["fp16"]["checks"])
    assert abs(rep["fp16"]["perplexity_change"]["train_d2l"]) < 0.01
    assert rep["fp16"]["bytes"] < 0.6 * rep["optimized"]["bytes"]


def test_fp16_variant_serves(variants):
    out, _ = variants
    rt = ModelRuntime(out / "fp16.onnx")
    ref = ModelRuntime(D2L, RuntimeOptions(fast_path=False))
    ids = np.array([rt.tokenizer.encode("time traveller")], np.int64)
    a, _ = rt.step(ids, rt.zero_state())
    b, _ = ref.step(ids, ref.zero_state())
    assert rt.has_fused and np.abs(a - b).max() < 0.1


def test_the_fp16_bound_refuses_coarser_weights(tmp_path, monkeypatch):
    """Weights truncated to bfloat16 (8 significand bits, not float16's 11) stand for a broken
    fp16 graph: within the contract, close (logits within 0.21), and outside the bound."""

    def bf16_model(base):
        model = onnx.ModelProto()
        model.CopyFrom(base)
        for init in model.graph.initializer:
            w = onnx.numpy_helper.to_array(init)
            if w.dtype == np.float32:
                cut = (w.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
                init.CopyFrom(onnx.numpy_helper.from_array(cut, init.name))
        return model

    monkeypatch.setattr(variants_mod, "fp16_model", bf16_model)
    with pytest.raises(ToleranceExceeded, match=r"'logits' differs by up to .* vs the base model"):
        variants_mod.write_variants(D2L, tmp_path, ("fp16",))
