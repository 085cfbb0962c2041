"""Graphs derived from an exported GRU language model's own weights, for the decode path.

- the decode step (seq = 1): the input projection as a Gather of a precomputed
  [vocab, 3 x hidden] table instead of a one-hot MatMul (or, for an embedding model, an
  embedding Gather and the GRU's input MatMul), and a hand-written GRU cell (Gemm and
  elementwise ops) instead of the GRU operator; 10-40% faster than the exported graph here.
- the fused K-token graph: an ONNX Loop that runs the decode step, samples the next token
  (greedy, or temperature / min-p / top-k / top-p with the uniforms passed in, exactly as
  gru_serve.sampling does in numpy) and feeds it back, K times in one session.run.

gru_serve.engine.runtime builds sessions from them and checks them against the exported graph;
gru-export variants writes them out. They are a function of the model contract alone, so both
import them from here.
"""
