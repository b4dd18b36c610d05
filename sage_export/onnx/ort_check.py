"""ONNX Runtime checks of an exported model: the op against the NumPy reference, logits, perplexity and greedy
generation against PyTorch, and the memory a session takes with and without constant folding.

The torch model given to these checks must hold the decoded quantized weights (materialize.apply_dequantized),
so that both sides compute the same function and any difference is the export's.

`python -m sage_export.onnx.ort_check memory MODEL.onnx [--no-constant-folding]` prints one session's memory
figures as JSON; session_memory() runs it in a fresh process so that nothing else in this process is counted.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

from ..eval.perplexity import PerplexityResult, perplexity, read_eval_text, tokenize_text, windows
from ..format.bits import n_planes
from ..format.sage_layout import PackedLinear, pack_sage, salient_q_limit
from ..malloc import map_large_allocations
from ..runtime import ort_op
from .function import MIN_OPSET, add_function, sage_node
from .reference import sage_binary_gemm_packed

# ----------------------------------------------------------------------------------------------- sessions


def make_session(path: Path | str | bytes, constant_folding: bool = True, threads: int | None = None,
                 custom_op: bool | None = None):
    """A CPU session; `session.sage_runtime` says what runs SageBinaryGemm in it.

    custom_op=None (the default) uses the native library (runtime/ort_op.py) when it is built, else the function
    body, saying so once; True requires the library, False forces the function body. With the library, each
    SageBinaryGemm reads its packed bits directly and nothing dense is ever decoded, so the session always folds
    constants (only the float parts fold, e.g. lm_head's float32 copy) and keeps ORT's arena, whatever
    `constant_folding` says.

    With the function body and constant_folding=False, the dequantization inside SageBinaryGemm runs on every call
    instead of being folded into dense float32 weights at load time (less memory, slower)."""
    options = ort.SessionOptions()
    # No busy-waiting between calls: these sessions share the process and its cores with torch.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    if custom_op and not ort_op.available():
        raise RuntimeError(f"the SageBinaryGemm library is required but not available: {ort_op.describe()}")
    native = ort_op.register(options) if custom_op is not False else False
    fold = constant_folding or native
    if not fold:
        # Unfolded, every SageBinaryGemm decodes a dense float32 weight on every call. With ORT's memory arena and
        # memory patterns those buffers are kept: measured on chains of 4096 x 11008 layers, 1.5 GB kept at one
        # layer and 3.5 GB at four, so a session grew with the model; with both off, 0.08-0.16 GB at any depth,
        # for 1.4-1.7x the time per call (benchmarks/ort_session_memory.md).
        options.enable_mem_pattern = False
        options.enable_cpu_mem_arena = False
        map_large_allocations()  # without the arena, freed buffers are glibc's: have them returned (malloc.py)
    source = path if isinstance(path, bytes) else str(path)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=[] if fold else ["ConstantFolding"])
    session.sage_runtime = (ort_op.describe() if native else
                            f"{ort_op.FUNCTION_BODY}, constant folding {'on' if fold else 'off'}")
    return session


# ----------------------------------------------------------------------------------------------- op level


def random_packed(rng: np.random.Generator, n: int, k: int, n_groups: int, salient_density: float = 0.05,
                  salient_bits: int = 4, empty_rows: int = 1, row_multipliers: bool = True) -> PackedLinear:
    """A random packed layer; the first `empty_rows` rows have no salient entry. Without row_multipliers every
    r_n is 1, which the packing stores as an empty row_scales."""
    limit = salient_q_limit(salient_bits)
    mask = rng.random((n, k)) < salient_density
    mask[:empty_rows] = False
    return pack_sage(
        signs=rng.random((n, k)) < 0.5,
        group_index=rng.integers(0, n_groups, (n, k)),
        group_scales=rng.uniform(0.005, 0.1, n_groups),
        salient_mask=mask,
        salient_q=rng.integers(-limit, limit + 1, (n, k)),
        salient_scale=rng.uniform(0.01, 0.2, n),
        salient_bits=salient_bits,
        row_scales=rng.uniform(0.5, 2.0, n) if row_multipliers else None,
    )


def op_model(packed: PackedLinear, x_dtype=np.float32, bias: np.ndarray | None = None,
             packed_as_inputs: bool = False, x_rank: int = 3) -> onnx.ModelProto:
    """A one-node model Y = SageBinaryGemm(X [d0, ..., K], packed..., bias). The packed tensors are
    initializers (what an export holds; ORT constant-folds the decode) or, with packed_as_inputs, graph inputs
    (the decode runs on every call)."""
    x_type = helper.np_dtype_to_tensor_dtype(np.dtype(x_dtype))
    lead = [f"d{i}" for i in range(x_rank - 1)]
    inputs = [helper.make_tensor_value_info("X", x_type, [*lead, packed.in_features])]
    initializers = []
    for name, array in packed.tensors().items():
        if packed_as_inputs:
            inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype),
                                                        array.shape))
        else:
            initializers.append(numpy_helper.from_array(array, name))
    names = ["X", *packed.tensors()]
    if bias is not None:
        names.append("bias")
        initializers.append(numpy_helper.from_array(np.asarray(bias, dtype=np.float32), "bias"))
    output = helper.make_tensor_value_info("Y", x_type, [*lead, packed.out_features])
    graph = helper.make_graph([sage_node(names, "Y", "sage_gemm", packed.attrs())], "sage_binary_gemm",
                              inputs, [output], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", MIN_OPSET)])
    add_function(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def run_op(packed: PackedLinear, x: np.ndarray, bias: np.ndarray | None = None,
           packed_as_inputs: bool = False) -> np.ndarray:
    """Y from ONNX Runtime running the function body."""
    session = make_session(op_model(packed, x.dtype, bias, packed_as_inputs, x.ndim).SerializeToString())
    feeds = {"X": x, **(packed.tensors() if packed_as_inputs else {})}
    return session.run(["Y"], feeds)[0]


# (N, K, G, salient density): K % 8 != 0, every G up to 8, an empty salient set, a single row.
OP_CASES = ((24, 13, 1, 0.05), (16, 64, 2, 0.0), (33, 100, 3, 0.1), (8, 70, 4, 0.02), (5, 9, 8, 0.3),
            (1, 17, 2, 0.2))


def check_op(cases=OP_CASES, seed: int = 0) -> dict:
    """ORT vs the NumPy reference for every case, both X dtypes, with and without bias, packed tensors as
    initializers and as inputs. Returns the largest error relative to max|Y| per X dtype and the case count."""
    rng = np.random.default_rng(seed)
    worst = {"float32": 0.0, "float16": 0.0}
    count = 0
    for n, k, g, density in cases:
        packed = random_packed(rng, n, k, g, density, empty_rows=min(1, n - 1))
        for dtype in (np.float32, np.float16):
            x = rng.standard_normal((2, 3, k)).astype(dtype)
            for bias in (None, rng.standard_normal(n).astype(np.float32)):
                for as_inputs in (False, True):
                    got = run_op(packed, x, bias, as_inputs).astype(np.float64)
                    ref = sage_binary_gemm_packed(x, packed, bias).astype(np.float64)
                    err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
                    worst[np.dtype(dtype).name] = max(worst[np.dtype(dtype).name], err)
                    count += 1
    return {"cases": count, "max_rel_err": worst, "planes": sorted({n_planes(c[2]) for c in cases})}


# ----------------------------------------------------------------------------------------------- decoder runs


def cache_inputs(session) -> list[tuple[str, int, int]]:
    """(name, kv_heads, head_dim) of each past_key_values input."""
    return [(i.name, i.shape[1], i.shape[3]) for i in session.get_inputs() if i.name.startswith("past_key_values.")]


def decoder_feeds(session, input_ids: np.ndarray, past: dict[str, np.ndarray] | None = None) -> dict:
    """Feeds for ids [batch, seq] after `past` (None: empty cache). No padding: the mask is all ones."""
    batch, seq = input_ids.shape
    if past is None:
        past = {name: np.zeros((batch, h, 0, d), np.float32) for name, h, d in cache_inputs(session)}
    past_len = next(iter(past.values())).shape[2] if past else 0
    return {"input_ids": input_ids.astype(np.int64),
            "attention_mask": np.ones((batch, past_len + seq), np.int64),
            "position_ids": np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)),
            **past}


def error_figures(got: np.ndarray, ref: np.ndarray) -> dict:
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "rel_l2": float(np.linalg.norm(diff) / np.linalg.norm(ref)),
            "max_abs_over_max_ref": float(diff.max() / np.abs(ref).max())}


@torch.no_grad()
def torch_logits(torch_model, input_ids) -> np.ndarray:
    """Prefill logits of torch on ids [batch, seq], float32."""
    ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
    return torch_model(ids, use_cache=False).logits.float().numpy()


def compare_logits(session, torch_model, input_ids, ref: np.ndarray | None = None) -> dict:
    """Prefill logits ORT vs torch on ids [batch, seq] (empty cache); `ref`: torch's, when computed already."""
    ids = np.asarray(input_ids, dtype=np.int64)
    ref = torch_logits(torch_model, ids) if ref is None else ref
    got = session.run(["logits"], decoder_feeds(session, ids))[0]
    return {**error_figures(got, ref), "tokens": int(ids.size),
            "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean())}


def _window_nll_sum_ort(session, window: torch.Tensor) -> float:
    logits = session.run(["logits"], decoder_feeds(session, window.numpy()[None]))[0][0, :-1]
    return torch.nn.functional.cross_entropy(torch.from_numpy(logits), window[1:], reduction="sum").item()


def perplexity_ort(session, ids: torch.Tensor, ctx: int, n_windows: int | None = None,
                   text: str = "") -> PerplexityResult:
    """Perplexity exactly as eval.perplexity computes it for torch (SPEC §5), with ORT producing the logits."""
    chunks = windows(ids, ctx, n_windows)
    n_tok = chunks.shape[0] * (ctx - 1)
    nll = sum(_window_nll_sum_ort(session, w) for w in chunks) / n_tok
    return PerplexityResult(math.exp(nll), nll, ctx, chunks.shape[0], n_tok, text)


def greedy_generate_ort(session, prompt_ids, n_new: int) -> list[int]:
    """n_new greedy tokens, one decoder call per token after the prefill, the cache fed back each step.
    Never stops early (no EOS handling), so both sides produce exactly n_new tokens."""
    ids = np.asarray(prompt_ids, dtype=np.int64).reshape(1, -1)
    output_names = [o.name for o in session.get_outputs()]
    past, tokens = None, []
    for _ in range(n_new):
        outputs = dict(zip(output_names, session.run(output_names, decoder_feeds(session, ids, past))))
        tokens.append(int(outputs["logits"][0, -1].argmax()))
        past = {name.replace("present.", "past_key_values.", 1): value
                for name, value in outputs.items() if name.startswith("present.")}
        ids = np.array([[tokens[-1]]], dtype=np.int64)
    return tokens


@torch.no_grad()
def greedy_generate_torch(torch_model, prompt_ids, n_new: int) -> list[int]:
    """transformers' greedy generate (with its KV cache), with EOS stopping turned off."""
    from transformers import GenerationConfig

    ids = torch.as_tensor(np.asarray(prompt_ids, dtype=np.int64)).reshape(1, -1)
    config = GenerationConfig(do_sample=False, max_new_tokens=n_new, min_new_tokens=0, eos_token_id=None,
                              pad_token_id=0)
    out = torch_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, ids.shape[1]:].tolist()


# ----------------------------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure_session_memory(path: Path, constant_folding: bool) -> dict:
    """In this process: resident memory (VmRSS) before creating the session, after creating it and after one
    8-token prefill; the deltas are what the session holds."""
    base = _rss_bytes()
    session = make_session(path, constant_folding)
    loaded = _rss_bytes()
    session.run(["logits"], decoder_feeds(session, np.arange(1, 9, dtype=np.int64)[None]))
    ran = _rss_bytes()
    return {"constant_folding": constant_folding, "sage_runtime": session.sage_runtime, "rss_base_mb": base / 2**20,
            "session_load_delta_mb": (loaded - base) / 2**20, "after_run_delta_mb": (ran - base) / 2**20}


def session_memory(path: Path, constant_folding: bool) -> dict:
    """measure_session_memory in a fresh Python process, so the figure holds only ORT and the model."""
    args = [sys.executable, "-m", "sage_export.onnx.ort_check", "memory", str(path)]
    if not constant_folding:
        args.append("--no-constant-folding")
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["how"] = ("VmRSS delta in a fresh process: after creating the session, and after one 8-token prefill, "
                     "minus before")
    return result


# ----------------------------------------------------------------------------------------------- all checks

PROMPT = "The capital of France is"


# What the model command demands of ONNX Runtime against PyTorch running the same decoded weights (both compute in
# float32 from the same float16-rounded float parts, so the differences are summation order: ~1e-6 measured).
# The op against the NumPy reference: float32 X agrees to rounding (~5e-7 measured); float16 X is compared after
# both round Y to float16, so it agrees exactly or to one float16 step.
THRESHOLDS = {"op_rel_err_float32": 1e-5, "op_rel_err_float16": 1e-3, "logits_rel_l2": 1e-3,
              "argmax_agreement": 0.99, "perplexity_rel_diff": 1e-3}


def run_checks(result, torch_model, tokenizer, eval_text: Path | None = None, ctx: int = 512, n_windows: int = 2,
               n_new: int = 8, memory: bool = False, prompt_text: str = PROMPT,
               constant_folding: bool = False, release_torch: Callable[[], None] | None = None) -> dict:
    """Every figure for the report, and `failures`: the thresholds it missed (empty when it passed).

    With the native library built (runtime/ort_op.py), SageBinaryGemm reads the packed bits directly and the
    session is fast and small. Without it, the function body runs, and the session does not fold constants by
    default: folding decodes every packed layer into a dense float32 initializer at load time (for SmolLM2-135M,
    +4,994 MB measured against +295 MB without), so memory would grow with the model; unfolded, each
    SageBinaryGemm decodes its own weight when it runs and frees it. The price is speed (about 2 s per decoded token
    for SmolLM2-135M on 2 cores, every packed layer decoded each call), so the comparison is kept short: a prompt,
    n_new greedy tokens through the KV cache, up to 256 tokens of logits, `n_windows` windows.

    PyTorch runs first and ONNX Runtime after. With release_torch, it is called in between, once this function
    holds no reference to the torch model any more, so that the caller can drop the model and its packed layers:
    otherwise those and the session's initializers are both in memory (LLaMA-2-7B shapes: +366 MB per layer in
    this step against +134 MB in the quantize step, benchmarks/scale.md)."""
    prompt = tokenizer(prompt_text, add_special_tokens=False).input_ids
    eval_ids = tokenize_text(tokenizer, read_eval_text(eval_text)) if eval_text is not None else None
    # Logits on up to 256 tokens of the evaluation text when there is one, else on the prompt.
    logits_ids = (np.asarray(prompt) if eval_ids is None else eval_ids[:256].numpy())[None]
    name = Path(eval_text).name if eval_text is not None else ""
    torch_tokens = greedy_generate_torch(torch_model, prompt, n_new)
    ref_logits = torch_logits(torch_model, logits_ids)
    torch_ppl = (perplexity(torch_model, eval_ids, ctx, n_windows, name, progress=False)
                 if eval_ids is not None else None)
    if release_torch is not None:
        del torch_model
        release_torch()

    session = make_session(result.onnx_path, constant_folding=constant_folding)
    ort_tokens = greedy_generate_ort(session, prompt, n_new)
    checks = {
        "op": check_op(),
        "logits": compare_logits(session, None, logits_ids, ref_logits),
        "greedy": {"n_new": n_new, "prompt": prompt_text, "identical": ort_tokens == torch_tokens,
                   "first_mismatch": next((i for i, (a, b) in enumerate(zip(ort_tokens, torch_tokens)) if a != b),
                                          None),
                   "text_ort": tokenizer.decode(ort_tokens)},
        "session": f"ONNX Runtime CPU, SageBinaryGemm by the {session.sage_runtime}",
        "sage_runtime": "custom_op" if session.sage_runtime.startswith("custom op") else "function_body",
        "thresholds": THRESHOLDS,
    }
    if eval_ids is not None:
        ort_ppl = perplexity_ort(session, eval_ids, ctx, n_windows, name)
        checks["perplexity"] = {"ort": ort_ppl.to_dict(), "torch": torch_ppl.to_dict(),
                                "rel_diff": abs(ort_ppl.ppl - torch_ppl.ppl) / torch_ppl.ppl}
    if memory:
        checks["memory"] = {"constant_folding": session_memory(result.onnx_path, True),
                            "no_constant_folding": session_memory(result.onnx_path, False)}
    checks["failures"] = check_failures(checks)
    return checks


def check_failures(checks: dict) -> list[str]:
    """One short phrase per missed threshold, in the order a reader would look."""
    out = []
    for dtype, err in checks["op"]["max_rel_err"].items():
        if not err <= THRESHOLDS[f"op_rel_err_{dtype}"]:
            out.append(f"the op's {dtype} output is {err:.2e} (relative) off the NumPy reference")
    logits = checks["logits"]
    if not logits["rel_l2"] <= THRESHOLDS["logits_rel_l2"]:  # also catches NaN
        out.append(f"logits rel. L2 error {logits['rel_l2']:.2e} > {THRESHOLDS['logits_rel_l2']:g}")
    if not logits["argmax_agreement"] >= THRESHOLDS["argmax_agreement"]:
        out.append(f"argmax agreement {logits['argmax_agreement']:.3f} < {THRESHOLDS['argmax_agreement']:g}")
    if not checks["greedy"]["identical"]:
        out.append(f"greedy tokens differ from token {checks['greedy']['first_mismatch']}")
    ppl = checks.get("perplexity")
    if ppl is not None and not ppl["rel_diff"] <= THRESHOLDS["perplexity_rel_diff"]:
        out.append(f"perplexity differs by {ppl['rel_diff']:.2e} (relative) > {THRESHOLDS['perplexity_rel_diff']:g}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sage_export.onnx.ort_check")
    sub = parser.add_subparsers(dest="command", required=True)
    mem = sub.add_parser("memory", help="print one session's memory figures as JSON")
    mem.add_argument("onnx", type=Path)
    mem.add_argument("--no-constant-folding", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(measure_session_memory(args.onnx, not args.no_constant_folding)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
