"""`mistral-edge moderate`: the model's own verdict on a text (self-reflection), with a score per category."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..runtime.moderate import Moderator
from .generate import REFUSED, RunOptions, _stdout, _text, open_run
from .options import ModelOpt, ThreadsOpt, TrustPickleOpt


def moderate(
    text: Annotated[str, typer.Argument(help="the text to judge (a request, or with --reply the request it answers)")],
    bundle: Annotated[Optional[Path], typer.Option("--bundle", "-b", help="bundle directory")] = None,
    model: ModelOpt = None,
    reply: Annotated[Optional[str], typer.Option(help="judge this reply to TEXT instead of TEXT itself")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the verdict and scores as one JSON object")] = False,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate", help="divide the scores by a content-free text's (helps small models; one more pass)")] = False,
    threads: ThreadsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    verify: Annotated[Optional[bool], typer.Option(
        "--verify/--no-verify", help="check the bundle's checksums first (default: on)")] = None,
) -> int:
    """Classify TEXT as acceptable or illegal, hateful or advice (unqualified legal, medical or financial).
    Exit status: 0 acceptable, 3 unacceptable, 1 bad input."""
    text, out = _text(text, "the text"), _stdout()
    if reply is not None:
        reply = _text(reply, "--reply")
    opts = RunOptions(bundle=bundle, model=model, threads=threads, trust_pickle=trust_pickle, verify=verify)
    gen, fmt, _ = open_run(opts)
    verdict = Moderator(gen, fmt, calibrate=calibrate).classify(text, reply)
    if as_json:
        out.write(json.dumps({"verdict": verdict.category, "scores": verdict.scores}) + "\n")
    else:
        out.write(f"verdict: {verdict.category}\n")
        out.writelines(f"{label:<11} {score:.4f}\n" for label, score in verdict.scores.items())
    out.flush()
    return 0 if verdict.acceptable else REFUSED
