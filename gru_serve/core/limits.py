"""A request's limits: concurrent streams (per server and per token), and its text's size."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

from gru_serve.engine.api import ModelRuntime
from gru_serve.ops.errors import InvalidArgument, ResourceExhausted
from gru_serve.ops.settings import Settings


class StreamSlots:
    """The streams in flight, in all and by owner (max_streams, max_streams_per_token)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.active = 0
        self.by_owner: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def slot(self, owner: str) -> Iterator[None]:
        """Count a request against max_streams and max_streams_per_token while it runs."""
        s = self.settings
        if self.active >= s.max_streams:
            raise ResourceExhausted(f"too many concurrent streams (the limit is max_streams={s.max_streams})")
        if owner and self.by_owner[owner] >= s.max_streams_per_token:
            raise ResourceExhausted(
                f"too many concurrent streams for this token (the limit is "
                f"max_streams_per_token={s.max_streams_per_token})"
            )
        self.active += 1
        self.by_owner[owner] += 1
        try:
            yield
        finally:
            self.active -= 1
            self.by_owner[owner] -= 1
            if not self.by_owner[owner]:
                del self.by_owner[owner]


def encode(settings: Settings, rt: ModelRuntime, text: str, name: str) -> list[int]:
    """The ids of a request's text, by the model's tokenizer (unknown input per its policy:
    InvalidArgument naming `name` where it has no unknown token), within both limits:
    max_prompt_chars on the text as sent, max_prompt_tokens on its ids."""
    s = settings
    if len(text) > s.max_prompt_chars:
        raise InvalidArgument(
            f"{name} has {len(text)} characters; the limit is {s.max_prompt_chars} (max_prompt_chars)"
        )
    ids = rt.tokenizer.encode(text, field=name)
    if len(ids) > s.max_prompt_tokens:
        raise InvalidArgument(
            f"{name} has {len(ids)} tokens; the limit is {s.max_prompt_tokens} (max_prompt_tokens)"
        )
    return ids
