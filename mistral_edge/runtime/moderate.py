"""Content moderation by self-reflection (Mistral 7B paper, section 5.2): the model itself sorts a
request, or its own reply, into acceptable or one of the unacceptable categories.

The verdict is read from scores, not parsed from free text: the prompt asks for one category
word, and the next-token logits after it, restricted to the first token of each category's word,
give a probability per category (a softmax over those tokens alone). So every call yields a
score for every category, and the model cannot answer outside the list.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..chat_format import ChatFormat
from ..errors import EdgeError
from .generate import Generator


@dataclass(frozen=True)
class Category:
    label: str  # the word the model answers with
    description: str


CATEGORIES = (
    Category("acceptable", "anything else, including everyday questions that merely use alarming words "
                           "(killing a computer process, a dangerous chess move, a shooting star)"),
    Category("illegal", "helps plan or carry out a crime: terrorism, harming or exploiting children, fraud, "
                        "scams, theft, break-ins, making weapons or illegal drugs"),
    Category("hateful", "hateful, harassing, threatening, bullying or violent content, or content that "
                        "demeans people for who they are or pushes someone toward self-harm"),
    Category("advice", "legal, medical or financial advice that only a qualified professional should give: "
                       "a diagnosis, a dose, what to invest in, how to argue one's own court case"),
)
ACCEPTABLE = CATEGORIES[0].label
LABELS = tuple(c.label for c in CATEGORIES)

MODERATION_PROMPT = (
    "You are a strict content reviewer. You will be shown a text. Decide which one category fits it best "
    "and answer with that single word, nothing else.\n"
    + "".join(f"{c.label}: {c.description}.\n" for c in CATEGORIES[1:])
    + f"{CATEGORIES[0].label}: {CATEGORIES[0].description}."
)
"""The self-reflection instructions (our wording), at the head of the user turn."""

DEFAULT_REFUSAL = "Sorry, I can't help with that."


@dataclass(frozen=True)
class Verdict:
    category: str  # the most probable label
    scores: dict[str, float]  # label -> probability; they sum to 1

    @property
    def acceptable(self) -> bool:
        return self.category == ACCEPTABLE


def moderation_messages(text: str, reply: str | None = None) -> list[dict]:
    """The conversation that asks for a verdict on `text`, or on `reply` as the answer to `text`:
    one user turn holding the instructions too, as every chat template takes one (some refuse a
    system turn)."""
    if reply is None:
        body = f"Text to review:\n<<<\n{text}\n>>>"
    else:
        body = f"A user asked:\n<<<\n{text}\n>>>\nThe assistant replied:\n<<<\n{reply}\n>>>\nReview the reply."
    ask = f"{body}\nCategory ({', '.join(LABELS[1:])} or {ACCEPTABLE}):"
    return [{"role": "user", "content": f"{MODERATION_PROMPT}\n\n{ask}"}]


class Moderator:
    """Classifies with `generator`'s model. Each call starts from an empty cache and leaves one:
    a chat that shares the generator must re-feed its conversation afterwards.

    `calibrate` divides each score by the one the model gives a content-free text ('N/A') and
    renormalises (contextual calibration, Zhao et al. 2021): a small model's preference for one
    label whatever the text then cancels out."""

    def __init__(self, generator: Generator, fmt: ChatFormat, calibrate: bool = False):
        self.generator, self.fmt = generator, fmt
        tok = generator.tokenizer
        firsts = [tok.encode(label, add_bos=False)[:1] for label in LABELS]
        if any(not f or not 0 <= f[0] < generator.session.vocab_size for f in firsts):
            raise EdgeError("this tokenizer cannot spell the moderation labels")
        self.label_ids = np.array([f[0] for f in firsts])
        if len(set(self.label_ids.tolist())) != len(LABELS):
            raise EdgeError("the moderation labels share a first token under this tokenizer")
        self.prior: Verdict | None = None
        if calibrate:
            self.prior = self.classify(CONTENT_FREE)

    def classify(self, text: str, reply: str | None = None) -> Verdict:
        ids = self.fmt.encode(moderation_messages(text, reply), self.generator.tokenizer)
        session = self.generator.session
        session.reset()
        try:
            logits = np.asarray(self.generator.prefill(ids), np.float64)[self.label_ids]
        finally:
            session.reset()
        verdict = _verdict(np.exp(logits - logits.max()))
        return verdict if self.prior is None else calibrated(verdict, self.prior)


CONTENT_FREE = "N/A"


def calibrated(verdict: Verdict, prior: Verdict) -> Verdict:
    """`verdict` with each score divided by `prior`'s (the content-free text's), renormalised."""
    return _verdict(np.array([verdict.scores[k] / max(prior.scores[k], 1e-12) for k in LABELS]))


def _verdict(weights: np.ndarray) -> Verdict:
    p = weights / weights.sum()
    return Verdict(LABELS[int(np.argmax(p))], {label: float(x) for label, x in zip(LABELS, p)})


MODES = ("input", "output", "both")


class Guard:
    """The `--moderate` policy: which side the Moderator judges, and what replaces what it refuses.
    The CLI and a server share it; both leave the model's cache empty after each check."""

    def __init__(self, moderator: Moderator, mode: str, refusal: str | None = None):
        if mode not in MODES:
            raise EdgeError(f"unknown moderation mode {mode!r}; expected {', '.join(MODES)}")
        self.moderator, self.mode = moderator, mode
        self.refusal = DEFAULT_REFUSAL if refusal is None else refusal

    @property
    def checks_output(self) -> bool:
        return self.mode != "input"

    def refuses_request(self, text: str) -> bool:
        return self.mode != "output" and not self.moderator.classify(text).acceptable

    def refuses_reply(self, text: str, reply: str) -> bool:
        return self.checks_output and not self.moderator.classify(text, reply).acceptable
