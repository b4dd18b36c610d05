"""Text from an exported model through ONNX Runtime, one decoder call per token with the KV cache fed back: what
`sage-export generate` streams. The same decoder calls as the ORT check (ort_check.decoder_feeds)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from .ort_check import decoder_feeds


def find_onnx(artifact: Path) -> Path:
    """model.onnx of a `model` output directory (ARTIFACT/onnx/model.onnx), an `export` output directory, or the
    file itself. FileNotFoundError with what was looked for."""
    artifact = Path(artifact)
    for candidate in (artifact, artifact / "onnx" / "model.onnx", artifact / "model.onnx"):
        if candidate.is_file() and candidate.suffix == ".onnx":
            return candidate
    raise FileNotFoundError(f"no exported model in {artifact} (looked for onnx/model.onnx and model.onnx)")


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
