#!/usr/bin/env python3
"""Write the code evaluation texts (code.dev.txt, code.test.txt, code.manifest.json) built from this Python's
standard library; the rule is in sage_export/eval/code_text.py.

    python tools/make_code_text.py --out out/code_text
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sage_export.eval.code_text import write_code_texts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--stdlib", type=Path, default=None, help="library root (default: this Python's stdlib)")
    args = p.parse_args(argv)
    manifest = write_code_texts(args.out, args.stdlib)
    for name, t in manifest["texts"].items():
        print(f"{args.out / t['file']}: {t['files']} files, {t['chars']:,} chars, sha256 {t['sha256']}")
    print(f"Python {manifest['python_version']} stdlib {manifest['stdlib']}; manifest "
          f"{args.out / 'code.manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
