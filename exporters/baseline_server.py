"""The baseline `gru-serve bench` compares against: what a user would write around d2l's
predict function. A plain synchronous gRPC server (thread pool, as in gRPC's Python examples)
serving the same API (gru_serve.v1 GenerationService.Generate), running PyTorch eager per
request with no batching: predict_ch8's loop (the prompt fed one character at a time, then
one call and one `int(y.argmax(...))` per token, autograd on as d2l writes it), one message
per token.

    python -m exporters.baseline_server --model MODEL.onnx [--port 0] [--workers 10]

Prints `baseline listening on HOST:PORT` when ready; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import torch

from exporters.torch_bench import load_model
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2 as pb
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2_grpc as pb_grpc

DEFAULT_WORKERS = 10  # grpc's Python examples use ThreadPoolExecutor(max_workers=10)


class BaselineServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self, net, vocab) -> None:
        self.net, self.vocab = net, vocab

    def Generate(self, request: pb.GenerateRequest, context):
        t0 = time.perf_counter()
        ids = self.vocab.encode(request.prompt) or [self.vocab.encode(" ")[0]]
        n = request.max_new_tokens if request.HasField("max_new_tokens") else 64
        temperature = request.sampling.temperature if request.sampling.HasField("temperature") else 0.0
        gen = (
            torch.Generator().manual_seed(request.sampling.seed)
            if request.sampling.HasField("seed")
            else None
        )
        net = self.net
        state = net.begin_state(batch_size=1)
        outputs = [ids[0]]

        def get_input() -> torch.Tensor:
            return torch.tensor([outputs[-1]]).reshape((1, 1))

        for y in ids[1:]:  # warm-up period, as predict_ch8
            _, state = net(get_input(), state)
            outputs.append(y)
        ttft = 0.0
        for i in range(n):
            if not context.is_active():
                return
            y, state = net(get_input(), state)
            if temperature > 0:
                probs = torch.softmax(y[-1].detach() / temperature, dim=0)
                tok = int(torch.multinomial(probs, 1, generator=gen))
            else:
                tok = int(y.argmax(dim=1).reshape(1))
            outputs.append(tok)
            if i == 0:
                ttft = time.perf_counter() - t0
            yield pb.GenerateResponse(tokens=[pb.Token(text=self.vocab.tokens[tok], id=tok, index=i)])
        yield pb.GenerateResponse(
            finished=pb.Finished(
                reason=pb.FINISH_REASON_LENGTH,
                prompt_tokens=len(ids),
                generated_tokens=n,
                time_to_first_token_s=ttft,
                total_time_s=time.perf_counter() - t0,
                normalized_prompt=self.vocab.decode(ids),
            )
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m exporters.baseline_server", description=__doc__)
    p.add_argument("--model", required=True, help="exported ONNX model (weights and vocabulary)")
    p.add_argument("--checkpoint", help="take the weights from this checkpoint instead")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50061, help="0: any free port")
    p.add_argument(
        "--workers", type=int, default=DEFAULT_WORKERS, help="thread pool size (concurrent requests)"
    )
    args = p.parse_args(argv)
    net, vocab = load_model(Path(args.model), Path(args.checkpoint) if args.checkpoint else None)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers))
    pb_grpc.add_GenerationServiceServicer_to_server(BaselineServicer(net, vocab), server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"baseline listening on {args.host}:{port}", flush=True)
    stop.wait()
    server.stop(0.5).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
