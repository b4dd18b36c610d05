"""`sage-export`: one command from a model to a packed checkpoint, ONNX, checks and a report.

Every argument is checked before any long work starts; failures print one line and exit non-zero, and the output
directory appears only when the whole run succeeded (it is assembled in a hidden temporary sibling).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def _add_quantizer_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantizer")
    g.add_argument("--method", default="sage", choices=["sage", "xnor", "rtn", "gptq", "billm"],
                   help="quantization method (default: sage; the others are baselines and cannot be exported to ONNX)")
    g.add_argument("--salient-bits", type=int, help="bits of salient weights (SAGE, default 4)")
    g.add_argument("--rho-bounds", type=float, nargs=2, metavar=("LO", "HI"), help="Brent search interval for ρ")
    g.add_argument("--fixed-rho", type=float, help="ablation: fixed saliency ratio instead of the Brent search")
    g.add_argument("--fixed-groups", type=int, help="ablation: fixed group count G instead of the kNN graph")
    g.add_argument("--group-candidates", type=int, nargs=2, metavar=("MIN", "MAX"), help="candidate G range")
    g.add_argument("--graph-samples", type=int, help="unsalient values subsampled for the kNN graph")
    g.add_argument("--bits", type=int, default=4, help="rtn/gptq bits (2, 3, 4)")
    g.add_argument("--group-size", type=int, default=128, help="rtn/gptq group size (64, 128)")
    g.add_argument("--calib-text", type=Path, help="calibration text for gptq/billm (default: WikiText-2 valid)")
    g.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default 32)")
    g.add_argument("--calib-seqlen", type=int, default=2048, help="calibration window length (default 2048)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-text", type=Path, help="raw text for perplexity (e.g. WikiText-2 wiki.test.raw)")
    g.add_argument("--ctx", type=int, default=2048, help="perplexity context length (default 2048)")
    g.add_argument("--eval-windows", type=int, help="evaluate only the first N windows (default: all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sage-export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("model", help="quantize → checkpoint → ONNX → ORT check (→ TensorRT engine) → report")
    m.add_argument("model", nargs="?", help="HF model directory or .gguf file (default: embedded SmolLM2-135M)")
    m.add_argument("--out", type=Path, required=True, help="output directory (must not exist unless --force)")
    m.add_argument("--force", action="store_true", help="replace an existing output directory")
    m.add_argument("--trt", action="store_true", help="also build a TensorRT engine with the SageBinaryGemm plugin")
    m.add_argument("--no-onnx", action="store_true", help="stop after the packed checkpoint and report")
    m.add_argument("--float-dtype", default="float16", choices=["float16", "float32"],
                   help="stored dtype of the unquantized tensors (embeddings, norms; default float16)")
    _add_quantizer_options(m)
    _add_eval_options(m)

    q = sub.add_parser("quantize", help="model → packed checkpoint + report (no ONNX)")
    q.add_argument("model", nargs="?")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--force", action="store_true")
    q.add_argument("--float-dtype", default="float16", choices=["float16", "float32"])
    _add_quantizer_options(q)
    _add_eval_options(q)

    e = sub.add_parser("export", help="packed checkpoint → ONNX with SageBinaryGemm + ORT check")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--force", action="store_true")

    ev = sub.add_parser("eval", help="perplexity of a packed checkpoint or a float model")
    ev.add_argument("artifact", nargs="?", help="checkpoint directory, HF directory or .gguf (default: SmolLM2)")
    _add_eval_options(ev)

    i = sub.add_parser("inspect", help="summarise a packed checkpoint or an output directory")
    i.add_argument("artifact", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import commands
    from .errors import is_user_error, user_message

    try:
        return commands.run(args)
    except KeyboardInterrupt:
        print("sage-export: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if not is_user_error(exc):
            raise
        print(f"sage-export: error: {user_message(exc)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
