"""tools/text_tail.py: the calibration text after the dev windows shares none of their tokens."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sage_export.eval.perplexity import read_eval_text, tokenize_text
from sage_export.models import load_model

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "text_tail.py"


def test_tail_starts_after_the_skipped_tokens_at_a_line_boundary(tiny_llama_dir, tmp_path):
    lines = [f" line {i} of the valid text , with some words ." for i in range(200)]
    text = tmp_path / "valid.tokens"
    text.write_text("\n".join(lines) + "\n")
    out = tmp_path / "tail.tokens"
    proc = subprocess.run([sys.executable, str(TOOL), "--model", str(tiny_llama_dir), "--skip-tokens", "300",
                           str(text), str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tail = out.read_text().splitlines()
    cut = len(lines) - len(tail)
    assert 0 < cut < len(lines) and tail == lines[cut:]
    tokenizer = load_model(tiny_llama_dir).tokenizer
    head = tmp_path / "head.tokens"
    # the fewest whole lines that hold the skipped tokens, read as the evaluation reads them
    head.write_text("\n".join(lines[:cut]))
    assert tokenize_text(tokenizer, read_eval_text(head)).numel() >= 300
    head.write_text("\n".join(lines[:cut - 1]))
    assert tokenize_text(tokenizer, read_eval_text(head)).numel() < 300


def test_too_short_a_text_fails_in_one_line(tiny_llama_dir, tmp_path):
    text = tmp_path / "short.tokens"
    text.write_text(" a few words .\n")
    proc = subprocess.run([sys.executable, str(TOOL), "--model", str(tiny_llama_dir), "--skip-tokens", "10000",
                           str(text), str(tmp_path / "tail.tokens")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "fewer than 10000 tokens" in proc.stderr
    assert not (tmp_path / "tail.tokens").exists()
