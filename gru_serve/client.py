"""A small synchronous client for the native API."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2 as pb
from gru_serve.grpc.generated.gru_serve.v1 import generation_pb2_grpc as pb_grpc

# The request header that carries a session's id, for session-affine load balancing.
SESSION_HEADER = "x-session-id"


def sampling(
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    **options: float | int | None,
) -> pb.SamplingParams:
    """The native SamplingParams message; the first five options may come by position, any
    option (a field of the message) by name; None leaves it unset."""
    given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed, **options}
    msg = pb.SamplingParams(stop=list(stop))
    for name, value in given.items():
        if value is not None:
            setattr(msg, name, value)
    return msg


class StreamLost(grpc.RpcError):
    """A stream reset in transit (RST_STREAM), e.g. by a load balancer whose backend died after
    the response began: Envoy can then only reset the stream, which gRPC reads as INTERNAL. No
    server reported an error, so it is UNAVAILABLE: retry; the session kept its last commit."""

    def __init__(self, cause: grpc.RpcError) -> None:
        super().__init__(cause)
        self.cause = cause

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return f"stream lost in transit ({self.cause.details()}); retry, the session is as last committed"


class ResponseStream:
    """A server stream (iterate it; .cancel() it) that reports transport resets as StreamLost."""

    def __init__(self, call) -> None:
        self._call = call

    def __iter__(self) -> ResponseStream:
        return self

    def __next__(self):
        try:
            return next(self._call)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.INTERNAL and "RST_STREAM" in (e.details() or ""):
                raise StreamLost(e) from e
            raise

    def __getattr__(self, name: str):
        return getattr(self._call, name)


def make_channel(
    target: str,
    tls_ca: bytes | None = None,
    client_cert: bytes | None = None,
    client_key: bytes | None = None,
) -> grpc.Channel:
    """Plaintext unless a CA is given; TLS with a client certificate is mTLS."""
    if tls_ca is None and client_cert is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(tls_ca, client_key, client_cert))


class Client:
    def __init__(
        self,
        target: str,
        channel: grpc.Channel | None = None,
        token: str = "",
        metadata: Sequence[tuple[str, str]] = (),
        affinity: bool = True,
    ) -> None:
        """`affinity`: send each session's id as the `x-session-id` header, which a load
        balancer hashes on (docker/envoy.yaml), so a session's turns reach the replica that
        served it last and holds its state."""
        self.channel = channel or grpc.insecure_channel(target)
        self.stub = pb_grpc.GenerationServiceStub(self.channel)
        auth = (("authorization", f"Bearer {token}"),) if token else ()
        self.metadata = (*auth, *metadata)
        self.affinity = affinity

    def _md(self, session_id: str = "") -> tuple[tuple[str, str], ...]:
        if session_id and self.affinity:
            return (*self.metadata, (SESSION_HEADER, session_id))
        return self.metadata

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create_session(self, text: str = "", model: str = "") -> pb.Session:
        return self.stub.CreateSession(
            pb.CreateSessionRequest(text=text, model=model), metadata=self.metadata
        )

    def get_session(self, session_id: str) -> pb.Session:
        return self.stub.GetSession(
            pb.GetSessionRequest(session_id=session_id), metadata=self._md(session_id)
        )

    def delete_session(self, session_id: str) -> None:
        self.stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), metadata=self._md(session_id))

    def fork_session(self, session_id: str) -> pb.Session:
        return self.stub.ForkSession(
            pb.ForkSessionRequest(session_id=session_id), metadata=self._md(session_id)
        )

    def export_session(self, session_id: str) -> bytes:
        """The session as a signed snapshot, for import_session or generate(snapshot=...)."""
        return self.stub.ExportSession(
            pb.ExportSessionRequest(session_id=session_id), metadata=self._md(session_id)
        ).snapshot

    def import_session(self, snapshot: bytes) -> pb.Session:
        return self.stub.ImportSession(pb.ImportSessionRequest(snapshot=snapshot), metadata=self.metadata)

    def rewind_session(self, session_id: str, turn: int) -> pb.Session:
        """Return the session to an earlier turn (Session.turns lists those it keeps)."""
        return self.stub.RewindSession(
            pb.RewindSessionRequest(session_id=session_id, turn=turn), metadata=self._md(session_id)
        )

    def generate(
        self,
        prompt: str = "",
        session_id: str = "",
        max_new_tokens: int | None = None,
        params: pb.SamplingParams | None = None,
        logprobs: bool = False,
        model: str = "",
        timeout: float | None = None,
        snapshot: bytes = b"",
        n: int = 0,
        commit: int | None = None,
        best_of: bool = False,
    ) -> ResponseStream:
        """The response stream: iterate it, cancel it with .cancel(). With `snapshot` (stateless
        mode) the final message carries the snapshot to continue from."""
        req = pb.GenerateRequest(
            session_id=session_id,
            prompt=prompt,
            sampling=params or pb.SamplingParams(),
            return_logprobs=logprobs,
            model=model,
            snapshot=snapshot,
            n=n,
            best_of=best_of,
        )
        if max_new_tokens is not None:
            req.max_new_tokens = max_new_tokens
        if commit is not None:
            req.commit = commit
        return ResponseStream(self.stub.Generate(req, timeout=timeout, metadata=self._md(session_id)))

    def generate_text(self, prompt: str = "", **kwargs: object) -> tuple[str, pb.Finished]:
        """Generated text and the final message."""
        text, finished = [], pb.Finished()
        for msg in self.generate(prompt, **kwargs):  # type: ignore[arg-type]
            text.extend(t.text for t in msg.tokens)
            if msg.HasField("finished"):
                finished = msg.finished
        return "".join(text), finished

    def generate_choices(
        self, prompt: str = "", n: int = 2, **kwargs: object
    ) -> tuple[list[str], list[pb.Finished]]:
        """Fan-out: each choice's generated text and final message, by choice."""
        texts: list[list[str]] = [[] for _ in range(max(n, 1))]
        finished = [pb.Finished() for _ in texts]
        for msg in self.generate(prompt, n=n, **kwargs):  # type: ignore[arg-type]
            for t in msg.tokens:
                texts[t.choice].append(t.text)
            if msg.HasField("finished"):
                finished[msg.finished.choice] = msg.finished
        return ["".join(t) for t in texts], finished

    def score(
        self, text: str, session_id: str = "", commit: bool = False, model: str = ""
    ) -> pb.ScoreResponse:
        return self.stub.Score(
            pb.ScoreRequest(text=text, session_id=session_id, commit=commit, model=model),
            metadata=self._md(session_id),
        )

    def model_info(self, model: str = "") -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(pb.ModelInfoRequest(model=model), metadata=self.metadata)
