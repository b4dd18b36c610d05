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
# Calibration defaults of `sage-export` (tools/screen_v2.py measures with the same). 64 rows of 128: on dev texts
# they beat 32 on SmolLM2 (both texts) and on Qwen2.5-Coder's wiki, not its code (docs/sage_v2.md, "How many
# calibration tokens"); more tokens also compensate more matrices.
CALIB_DEFAULTS = {"calib_samples": 64, "calib_seqlen": 128, "calib_from": "prompts", "seed": 0}


def _add_quantizer_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantizer")
    g.add_argument("--method", default="sage", choices=["sage", "xnor", "rtn", "gptq", "billm"],
                   help="quantization method (default: sage; the others are baselines and cannot be exported to ONNX)")
    g.add_argument("--preset", default="v2", choices=["v2", "paper"],
                   help="SAGE preset: v2 (default: activation-aware, meets --bits) or paper (SPEC §2 read literally, "
                        "data-free)")
    g.add_argument("--bits", type=float,
                   help="SAGE v2: target true bits per weight over all quantized layers, every stored byte counted "
                        "(default 3.2)")
    g.add_argument("--salient-bits", type=int, help="bits of salient weights (SAGE; default 8 for v2, 4 for paper)")
    g.add_argument("--rho-bounds", type=float, nargs=2, metavar=("LO", "HI"), help="paper: Brent search interval for ρ")
    g.add_argument("--fixed-rho", type=float, help="paper ablation: fixed saliency ratio instead of the Brent search")
    g.add_argument("--fixed-groups", type=int, help="paper ablation: fixed group count G instead of the kNN graph")
    g.add_argument("--group-candidates", type=int, nargs=2, metavar=("MIN", "MAX"), help="kNN graph's candidate G")
    g.add_argument("--graph-samples", type=int, help="unsalient values subsampled for the kNN graph")
    g.add_argument("--no-activation-weighting", action="store_true", help="v2 ablation: errors not weighted by h")
    g.add_argument("--activation-power", type=float, metavar="A",
                   help="v2: column weights m·(h/m)^A at this one power (default: chosen per model from "
                        "--activation-power-candidates; 1 weights errors by h itself)")
    g.add_argument("--activation-power-candidates", type=float, nargs="+", metavar="A",
                   help="v2: the powers tried (default 0.5 0.25): the one whose uncompensated result at 3.2 bits "
                        "(--activation-power-bits), whatever --bits, scores best on extra self-sampled held-out rows "
                        "is kept (see docs/sage_v2.md)")
    g.add_argument("--activation-power-bits", type=float, metavar="B",
                   help="v2: the budget the candidate powers are compared at (default 3.2, whatever --bits; give "
                        "--bits' value to compare them at the run's own budget)")
    g.add_argument("--no-sensitivity", action="store_true", help="v2 ablation: layers not weighted by sensitivity")
    g.add_argument("--graph-groups", action="store_true", help="v2 ablation: G from the kNN graph, not the budget")
    g.add_argument("--no-rho-price", action="store_true", help="v2 ablation: ρ search on error alone (no bit price)")
    g.add_argument("--no-compensation", action="store_true", help="v2 ablation: no GPTQ-style compensation")
    g.add_argument("--compensate-candidates", type=float, nargs="+", metavar="S",
                   help="v2 option: per matrix, compensate with each shrink S of XᵀX's cross terms (1: none) and keep "
                        "the lowest output error on extra self-held-out rows (e.g. 0 0.5 1; see docs/sage_v2.md)")
    g.add_argument("--row-multipliers", action="store_true",
                   help="v2 option: fit per-row multipliers r_n (the op's row_scales) (not the default: see docs/sage_v2.md)")
    g.add_argument("--code-bits", type=int, default=4, help="rtn/gptq: bits of each code (2, 3, 4)")
    g.add_argument("--group-size", type=int, default=128, help="rtn/gptq group size (32, 64, 128, 256)")
    g.add_argument("--calib-text", type=Path,
                   help="calibration text (default: text the model samples itself, seeded); never the eval text")
    g.add_argument("--calib-from", choices=["prompts", "bos"], default=CALIB_DEFAULTS["calib_from"],
                   help="self-sampled calibration starts from built-in prose and code requests in the model's chat "
                        "template (default), or from BOS alone (the earlier default)")
    g.add_argument("--calib-samples", type=int, default=CALIB_DEFAULTS["calib_samples"],
                   help=f"calibration sequences (default {CALIB_DEFAULTS['calib_samples']})")
    g.add_argument("--calib-seqlen", type=int, default=CALIB_DEFAULTS["calib_seqlen"],
                   help=f"tokens per calibration sequence (default {CALIB_DEFAULTS['calib_seqlen']})")
    g.add_argument("--seed", type=int, default=CALIB_DEFAULTS["seed"],
                   help=f"seed of every random choice (default {CALIB_DEFAULTS['seed']})")
    g.add_argument("--jobs", type=int, help="worker processes for the per-matrix work (default: every core)")
    g.add_argument("--stream", default="auto", choices=["auto", "yes", "no"],
                   help="read the weights to quantize from the model file one block or matrix at a time, so "
                        "memory holds about one decoder block plus what is packed (default auto: when the float32 "
                        "model exceeds 1/8 of this machine's memory; gptq/billm never stream)")


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-text", type=Path, help="raw text for perplexity (e.g. WikiText-2 wiki.test.raw)")
    g.add_argument("--ctx", type=int, default=2048, help="perplexity context length (default 2048)")
    g.add_argument("--eval-windows", type=int, help="evaluate only the first N windows (default: all)")


def _add_engine_options(p: argparse.ArgumentParser, required: bool) -> None:
    from .trt.targets import HARDWARE_COMPAT, TARGETS

    g = p.add_argument_group("TensorRT engine")
    g.add_argument("--target", choices=list(TARGETS), required=required,
                   help="edge: Jetson Orin sm_87, batch 1, context 2048, CUDA 12 plugin; l40: sm_89, batch up to 16, "
                        "context 4096; native: this machine's GPU, batch 1, context 2048" +
                        ("" if required else " (default with --trt: native)"))
    g.add_argument("--hardware-compat", choices=list(HARDWARE_COMPAT),
                   help="TensorRT hardware compatibility level (default none; which levels a target allows: "
                        "docs/engines.md)")
    g.add_argument("--timing-cache", type=Path,
                   help="start from this timing cache of an earlier build (each build writes timing.cache beside "
                        "its engine)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sage-export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("model", help="quantize → checkpoint → ONNX → ORT check (→ TensorRT engine) → report")
    m.add_argument("model", nargs="?", help="HF model directory or .gguf file (default: embedded SmolLM2-135M)")
    m.add_argument("--out", type=Path, required=True, help="output directory (must not exist unless --force)")
    m.add_argument("--force", action="store_true", help="replace an existing output directory")
    m.add_argument("--trt", action="store_true", help="also build a TensorRT engine with the SageBinaryGemm plugin")
    _add_engine_options(m, required=False)
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

    rw = sub.add_parser("rewrite", help="ONNX from another exporter (torch.onnx, Optimum) + packed checkpoint → "
                                        "the same graph with SageBinaryGemm nodes + ORT check")
    rw.add_argument("onnx", type=Path, help="the exported model.onnx (external data beside it is read in place)")
    rw.add_argument("checkpoint", type=Path, help="packed checkpoint of the same model (sage-export quantize)")
    rw.add_argument("--out", type=Path, required=True)
    rw.add_argument("--force", action="store_true")
    rw.add_argument("--name-map", type=Path,
                    help="JSON {checkpoint layer: ONNX weight initializer or MatMul/Gemm node name}, for layers "
                         "that matching by content cannot decide")

    en = sub.add_parser("engine", help="TensorRT engine of an exported ONNX for a deployment target")
    en.add_argument("onnx", type=Path, help="output directory of `model`, `export` or `rewrite`, or a model.onnx")
    en.add_argument("--out", type=Path, required=True, help="engine directory (model.engine, its .json, timing.cache)")
    en.add_argument("--force", action="store_true")
    _add_engine_options(en, required=True)

    ev = sub.add_parser("eval", help="perplexity of a packed checkpoint or a float model")
    ev.add_argument("artifact", nargs="?", help="checkpoint directory, HF directory or .gguf (default: SmolLM2)")
    _add_eval_options(ev)

    gen = sub.add_parser("generate", help="stream a continuation from an exported model through ONNX Runtime")
    gen.add_argument("artifact", type=Path, help="output directory of `model` or `export`, or a model.onnx")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="0 (default): greedy; above 0: sampled, seeded by --seed")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the checkpoint next to the ONNX)")
    gen.add_argument("--fold-constants", action="store_true",
                     help="decode every packed layer once at load: faster tokens, but dense float32 weights in "
                          "memory (default: each layer decodes when it runs)")

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
