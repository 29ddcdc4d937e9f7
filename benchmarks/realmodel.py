"""What the real-model benchmarks share: SmolLM2-135M, its calibration and evaluation.

Protocol (issue 13): calibration 64 x 512 tokens, the same for every row: by
default text the model generates itself (``lwq calibrate --calib self``, seed 0,
saved once under the work folder), or with ``--calib docs`` windows of
``zoo/data/calibration.txt`` (reStructuredText of the Python documentation, the
protocol of the first tables); WikiText-2 perplexity on the first quarter of ``wiki.test.raw``
(tokenised once, the first 20 windows of 2048 tokens) and, for final rows, on
the whole test set; KL divergence to the full-precision model on held-out
WikiText windows that the quarter does not contain.
"""

from __future__ import annotations

import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "zoo"
DOCS_CALIB = ZOO / "data" / "calibration.txt"
N_SAMPLES, SEQ_LEN = 64, 512
SELF_CALIB = Path("/tmp/lwq-bench") / f"calib-self-{N_SAMPLES}x{SEQ_LEN}.safetensors"
WIKI_CALIB = Path("/tmp/lwq-bench") / "wikitext-second-quarter.txt"
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
MODEL = "smollm2-135m"
WINDOW = 2048
QUARTER_WINDOWS = 20


def model_dir() -> Path:
    from lwq.realmodels import fetch

    return fetch(MODEL)


def calib_source(kind: str) -> Path:
    """The calibration source of ``kind``: ``self`` (generated once, then reused), ``docs``
    or ``wikitext`` (the second quarter of wiki.test.raw, as a text file)."""
    if kind == "docs":
        return DOCS_CALIB
    if kind == "wikitext":
        text = wikitext_part(1, 2)
        WIKI_CALIB.parent.mkdir(parents=True, exist_ok=True)
        WIKI_CALIB.write_text(text, encoding="utf-8")
        return WIKI_CALIB
    if not SELF_CALIB.is_file():
        SELF_CALIB.parent.mkdir(parents=True, exist_ok=True)
        cmd = lwq_cmd("calibrate", "--model", MODEL, "--calib", "self", "--out", str(SELF_CALIB))
        run_child([*cmd, "--n-samples", str(N_SAMPLES), "--seq-len", str(SEQ_LEN)])
    return SELF_CALIB


def calib_args(source: Path) -> list[str]:
    """The calibration flags of every lwq command of the protocol."""
    return ["--calib", str(source), "--n-samples", str(N_SAMPLES), "--seq-len", str(SEQ_LEN)]


def add_calib_arg(ap: Any) -> None:
    ap.add_argument(
        "--calib",
        choices=["self", "docs", "wikitext"],
        default="self",
        help="calibration of every row: the model's own text (default), the Python docs, or "
        "WikiText (the second quarter of wiki.test.raw: disjoint from the perplexity quarter "
        "and the held-out half)",
    )


def wikitext_part(first: int = 0, last: int = 4) -> str:
    """Quarters ``first`` to ``last`` of wiki.test.raw, by characters (the perplexity
    protocol reads the first, the held-out windows the second half)."""
    if not WIKITEXT.is_file():
        raise SystemExit(f"WikiText-2 not found at {WIKITEXT} (../shared is absent)")
    text = WIKITEXT.read_text(encoding="utf-8")
    return text[len(text) * first // 4 : len(text) * last // 4]


def token_ids(tok: Any, text: str) -> torch.Tensor:
    return torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"])


def wikitext_ids(tok: Any) -> torch.Tensor:
    return token_ids(tok, wikitext_part())


def quarter_ids(tok: Any) -> torch.Tensor:
    """The first 20 windows of 2048 tokens of the first quarter of wiki.test.raw."""
    return token_ids(tok, wikitext_part(0, 1))[: QUARTER_WINDOWS * WINDOW]


def second_quarter_windows(tok: Any, seq_len: int) -> torch.Tensor:
    """The second quarter of wiki.test.raw in windows of ``seq_len`` tokens: WikiText
    text that neither the perplexity quarter nor the held-out half holds."""
    ids = token_ids(tok, wikitext_part(1, 2))
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def heldout_windows(tok: Any, n: int, seq_len: int = 512) -> torch.Tensor:
    """``n`` windows from the second half of wiki.test.raw (the quarter is the first)."""
    return token_ids(tok, wikitext_part(2, 4))[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(model: Any, ids: torch.Tensor, window: int = WINDOW) -> float:
    from lwq.eval.perplexity import perplexity as ppl

    return ppl(model, ids, window, batch_size=1).perplexity


@dataclass(frozen=True)
class ChildResult:
    seconds: float
    peak_rss_mib: float
    stdout: str


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> ChildResult:
    """Run a command alone; its wall time and its own peak RSS (from wait4)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    return ChildResult(seconds, usage.ru_maxrss / 1024, stdout)


def stream_child(cmd: list[str]) -> Any:
    """Run a command alone and yield its stdout lines as they come (its stderr goes to ours).

    The rows a long child prints are saved as it goes, so a stop loses only the row under way.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1)
    assert proc.stdout is not None
    yield from proc.stdout
    if proc.wait() != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")


def children_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def lwq_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def fmt_ppl(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    return f"{x:,.0f}" if x >= 1000 else f"{x:.2f}"
