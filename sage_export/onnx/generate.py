"""Text from an exported model through ONNX Runtime, one decoder call per token with the KV cache fed back: what
`sage-export generate` streams. The same decoder calls as the ORT check (ort_check.decoder_feeds). Also the
perplexity of an exported model (`sage-export eval` of an ONNX artifact)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np

from .ort_check import decoder_feeds, make_session, perplexity_ort


def find_onnx(artifact: Path) -> Path:
    """model.onnx of a `model` output directory (ARTIFACT/onnx/model.onnx), an `export` output directory, or the
    file itself. FileNotFoundError with what was looked for."""
    artifact = Path(artifact)
    for candidate in (artifact, artifact / "onnx" / "model.onnx", artifact / "model.onnx"):
        if candidate.is_file() and candidate.suffix == ".onnx":
            return candidate
    raise FileNotFoundError(f"no exported model in {artifact} (looked for onnx/model.onnx and model.onnx)")


def onnx_artifact(artifact: Path | None) -> Path | None:
    """The model.onnx that `sage-export eval` should run through ONNX Runtime: the artifact when it is an .onnx
    file or an `export` output directory (model.onnx, no packed checkpoint), else None (a checkpoint or a float
    model, evaluated with PyTorch)."""
    if artifact is None:
        return None
    artifact = Path(artifact)
    if artifact.is_file() and artifact.suffix == ".onnx":
        return artifact
    if (artifact / "model.onnx").is_file() and not (artifact / "manifest.json").is_file():
        return artifact / "model.onnx"
    return None


def find_tokenizer_dir(artifact: Path, onnx_path: Path) -> Path:
    """The checkpoint next to the ONNX (a `model` output directory keeps its tokenizer in checkpoint/)."""
    for candidate in (Path(artifact) / "checkpoint", onnx_path.parent, onnx_path.parent.parent / "checkpoint"):
        if (candidate / "tokenizer_config.json").is_file() or (candidate / "tokenizer.json").is_file():
            return candidate
    raise FileNotFoundError(f"no tokenizer found next to {onnx_path}; pass --tokenizer DIR")


def stream_tokens(session, prompt_ids: list[int], max_new: int, eos_id: int | None = None,
                  temperature: float = 0.0, seed: int = 0) -> Iterator[int]:
    """Yield up to max_new token ids as they are computed: greedy at temperature 0, else sampled from
    softmax(logits / temperature) with a seeded generator. Stops after eos_id."""
    if not prompt_ids:
        raise ValueError("the prompt has no tokens")
    rng = np.random.default_rng(seed)
    names = [o.name for o in session.get_outputs()]
    ids, past = np.asarray(prompt_ids, dtype=np.int64).reshape(1, -1), None
    for _ in range(max_new):
        outputs = dict(zip(names, session.run(names, decoder_feeds(session, ids, past))))
        logits = outputs["logits"][0, -1].astype(np.float64)
        token = int(logits.argmax()) if temperature <= 0 else _sample(logits / temperature, rng)
        yield token
        if token == eos_id:
            return
        past = {name.replace("present.", "past_key_values.", 1): value
                for name, value in outputs.items() if name.startswith("present.")}
        ids = np.array([[token]], dtype=np.int64)


def _sample(logits: np.ndarray, rng: np.random.Generator) -> int:
    p = np.exp(logits - logits.max())
    return int(rng.choice(p.size, p=p / p.sum()))


def stream_text(tokenizer, tokens: Iterator[int]) -> Iterator[str]:
    """The new text after each token. Decoding the whole continuation each time (not token by token) keeps
    multi-byte characters split across tokens whole: a piece is only emitted once it decodes cleanly."""
    seen, shown = [], ""
    for token in tokens:
        seen.append(token)
        text = tokenizer.decode(seen, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            continue
        yield text[len(shown):]
        shown = text


class GenerationTiming:
    """Wall-clock figures of one generation: session start, time to the first token (prefill), decode rate."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.session_ready = self.first = self.last = None
        self.count = 0

    def session_made(self) -> None:
        self.session_ready = time.perf_counter()

    def wrap(self, tokens: Iterator[int]) -> Iterator[int]:
        for token in tokens:
            self.last = time.perf_counter()
            self.first = self.first or self.last
            self.count += 1
            yield token

    def summary(self, runtime: str) -> str:
        ready = self.session_ready or self.t0
        parts = [f"session start {ready - self.t0:.2f} s"]
        if self.first is not None:
            parts.append(f"prefill and first token {self.first - ready:.2f} s")
        if self.count > 1:
            rate = (self.count - 1) / max(self.last - self.first, 1e-9)
            parts.append(f"{self.count - 1} more tokens at {rate:.1f} tokens/s")
        return f"[{'; '.join(parts)}; SageBinaryGemm by the {runtime}]"


def evaluate_onnx(onnx_path: Path, eval_text: Path, ctx: int, n_windows: int | None,
                  tokenizer_dir: Path | None = None) -> dict:
    """Perplexity of an exported model through ONNX Runtime (same windows and formula as eval.perplexity), with
    the runtime that computed SageBinaryGemm."""
    from transformers import AutoTokenizer

    from ..eval.perplexity import read_eval_text, tokenize_text

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or find_tokenizer_dir(onnx_path.parent, onnx_path)))
    ids = tokenize_text(tokenizer, read_eval_text(eval_text))
    session = make_session(onnx_path)
    result = perplexity_ort(session, ids, ctx, n_windows, Path(eval_text).name).to_dict()
    result["runtime"] = f"ONNX Runtime CPU, SageBinaryGemm by the {session.sage_runtime}"
    return result
