"""Multi-turn chat over one Generator: each turn feeds only the tokens the cache has not seen.

The cache rolls, so a conversation may grow past W: the model then attends to
the last W tokens, and memory stays fixed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .generate import GenerationConfig, Generator


class ChatEngine:
    def __init__(self, generator: Generator, encode_messages: Callable[[list[dict]], list[int]]):
        self.generator = generator
        self.encode_messages = encode_messages
        self.messages: list[dict] = []
        self.fed: list[int] = []  # every token the cache has taken, in order

    def reply(self, text: str, cfg: GenerationConfig) -> Iterator[str]:
        """Stream the assistant's answer to `text`, then remember it for the next turn."""
        self.messages.append({"role": "user", "content": text})
        ids = self.encode_messages(self.messages)
        if ids[: len(self.fed)] != self.fed:  # the template re-tokenized history differently
            self.generator.session.reset()
            self.fed = []
        new = ids[len(self.fed):]
        pieces = []
        generated: list[int] = []
        for piece in self.generator.stream(new, cfg, on_token=generated.append, history=ids):
            pieces.append(piece)
            yield piece
        self.fed = ids + generated
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
