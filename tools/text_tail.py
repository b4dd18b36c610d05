"""Write a text's lines after its first --skip-tokens tokens (cut at a line boundary): a calibration text that
shares no token with the dev windows at the text's head.

The dev windows of WikiText-2 valid are its first W × ctx tokens (tools/screen_v2.py, tools/bench_quality.py read
whole lines joined with blank lines). Calibrating on the rest keeps every dev score honest:

    python tools/text_tail.py --model M.gguf --skip-tokens 40000 \\
        ../shared/data/wikitext2/wiki.valid.tokens out/calib/wiki.valid.after40k.tokens
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sage_export.eval.perplexity import join_paragraphs, tokenize_text  # noqa: E402
from sage_export.models import load_model  # noqa: E402


def head_lines(tokenizer, lines: list[str], skip_tokens: int) -> int:
    """The fewest leading lines whose evaluation text (join_paragraphs) holds at least skip_tokens tokens."""
    lo, hi = 0, len(lines)
    while lo < hi:
        mid = (lo + hi) // 2
        if tokenize_text(tokenizer, join_paragraphs(lines[:mid])).numel() >= skip_tokens:
            hi = mid
        else:
            lo = mid + 1
    return lo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the model whose tokenizer counts the tokens")
    p.add_argument("--skip-tokens", type=int, required=True)
    p.add_argument("text", type=Path)
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)
    lines = args.text.read_text(encoding="utf-8").splitlines()
    cut = head_lines(load_model(args.model).tokenizer, lines, args.skip_tokens)
    if cut >= len(lines):
        raise SystemExit(f"{args.text} has fewer than {args.skip_tokens} tokens")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines[cut:]) + "\n", encoding="utf-8")
    print(f"{args.out}: lines {cut + 1}..{len(lines)} of {args.text} (skipped {cut} lines, >= {args.skip_tokens} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
