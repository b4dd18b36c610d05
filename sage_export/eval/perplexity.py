"""Perplexity as in GPTQ/BiLLM (SPEC §5): join the text with "\n\n", tokenize once, cut non-overlapping windows
of `ctx` tokens, PPL = exp(mean token NLL over all windows)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean token negative log-likelihood (nats)
    ctx: int
    n_windows: int
    n_tokens: int  # tokens scored
    text: str  # which text, for reports
    window_nll: list[float] = field(default_factory=list, repr=False)  # NLL sum of each window, in order

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "window_nll"}

    def prefix(self, n_windows: int) -> "PerplexityResult":
        """The result over the first n windows: the same windows a run with that limit would score."""
        sums = self.window_nll[:n_windows]
        n_tok = len(sums) * (self.ctx - 1)
        nll = sum(sums) / n_tok
        return PerplexityResult(math.exp(nll), nll, self.ctx, len(sums), n_tok, self.text, sums)


def read_eval_text(path: Path) -> str:
    """The raw WikiText file, paragraphs joined with blank lines as in the reference protocol."""
    return join_paragraphs(Path(path).read_text(encoding="utf-8").splitlines())


def join_paragraphs(lines: list[str]) -> str:
    """WikiText lines as the evaluation reads them: joined with blank lines."""
    return "\n\n".join(lines)


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids


def windows(ids: torch.Tensor, ctx: int, limit: int | None = None) -> torch.Tensor:
    n = ids.numel() // ctx
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {ctx}")
    return ids[: n * ctx].view(n, ctx)


@torch.no_grad()
def window_nll_sum(model, window: torch.Tensor) -> float:
    """Sum of next-token NLL over one window (ctx - 1 predictions)."""
    logits = model(window.unsqueeze(0), use_cache=False).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()


def perplexity(model, ids: torch.Tensor, ctx: int = 2048, n_windows: int | None = None, text: str = "",
               progress: bool = True) -> PerplexityResult:
    chunks = windows(ids, ctx, n_windows)
    sums = [window_nll_sum(model, w)
            for w in tqdm(chunks, desc=f"perplexity ctx={ctx}", unit="win", disable=not progress, leave=False)]
    # Each window scores ctx - 1 tokens, as in the usual HF-style shift; stated in reports via n_tokens.
    return PerplexityResult(0.0, 0.0, ctx, 0, 0, text, sums).prefix(len(sums))
