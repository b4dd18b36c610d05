"""ONNX Runtime on the CPU: the ways to run an exported SAGE model, side by side. Writes benchmarks/ort_cpu.json and
benchmarks/ort_cpu.md.

Variants, each in a fresh process (its peak RSS is the process's, read by wait4):
  function_body         SageBinaryGemm by its ONNX function, constant folding off (what ran before the library)
  function_body_folded  the same with constant folding: every weight decoded into a dense float32 initializer
  custom_op             the native library (native/ort_sage), reading the packed bits
  fp32                  the same graph with every SageBinaryGemm replaced by a float32 MatMul of its decoded
                        weight: the cost of the unquantized model in ONNX Runtime (same shapes, same other ops)

Models: SmolLM2-135M as `sage-export model` exported it (--smollm2 DIR), and a decoder of Qwen2-0.5B's exact shape
(24 layers, hidden 896, MLP 4864, 14/2 heads, vocab 151,936, tied embeddings) with synthetic random weights, packed
with the G and salient density SmolLM2's default run chose per layer type (its quality means nothing; its speed
and memory do). Each run: session creation (s), one prefill of --prompt-tokens random tokens (tokens/s), then
greedy decode steps with the KV cache (tokens/s).

Also the acceptance figures of the default output: `sage-export generate` (48 new tokens) and the default run's
ORT check step (run_checks on the same model state as `sage-export model`), with the library and without.

    python tools/bench_ort.py --smollm2 out/smollm2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = ("function_body", "function_body_folded", "custom_op", "fp32")
# Per layer type: (G, salient density), the medians of SmolLM2's default run (out/smollm2 manifest, 2026-12-04).
QWEN_PACKING = {"q_proj": (4, 0.0044), "k_proj": (8, 0.0063), "v_proj": (16, 0.0051), "o_proj": (4, 0.0014),
                "gate_proj": (4, 0.0026), "up_proj": (4, 0.0011), "down_proj": (4, 0.0015)}


# ----------------------------------------------------------------------------------------------- one run (worker)


def run_worker(model: Path, variant: str, prompt_tokens: int, decode_tokens: int, seed: int) -> dict:
    """Session start, prefill and decode of one variant, in this process. Prints nothing; returns the figures."""
    from sage_export.onnx.ort_check import decoder_feeds, make_session

    options = {"function_body": dict(custom_op=False, constant_folding=False),
               "function_body_folded": dict(custom_op=False, constant_folding=True),
               "custom_op": dict(custom_op=True, constant_folding=True),
               "fp32": dict(custom_op=False, constant_folding=True)}[variant]
    t0 = time.perf_counter()
    session = make_session(model, **options)
    start_s = time.perf_counter() - t0
    vocab = session.get_outputs()[0].shape[-1]
    ids = np.random.default_rng(seed).integers(0, vocab, (1, prompt_tokens))
    names = [o.name for o in session.get_outputs()]
    t0 = time.perf_counter()
    outputs = dict(zip(names, session.run(names, decoder_feeds(session, ids))))
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        token = np.array([[int(outputs["logits"][0, -1].argmax())]])
        past = {n.replace("present.", "past_key_values.", 1): v for n, v in outputs.items() if n.startswith("present.")}
        outputs = dict(zip(names, session.run(names, decoder_feeds(session, token, past))))
    decode_s = time.perf_counter() - t0
    runtime = "dense float32 MatMul, constant folding on" if variant == "fp32" else session.sage_runtime
    return {"variant": variant, "sage_runtime": runtime, "session_start_s": start_s,
            "prompt_tokens": prompt_tokens, "prefill_s": prefill_s, "prefill_tokens_per_s": prompt_tokens / prefill_s,
            "decode_tokens": decode_tokens, "decode_s": decode_s, "decode_tokens_per_s": decode_tokens / decode_s}


def spawn(args: list[str], timeout: float, memory_limit_gb: float | None = None,
          env: dict | None = None) -> tuple[int, str, str, int]:
    """Run a child (env: variables added to ours); (exit status, stdout, stderr, its peak RSS in bytes, wait4)."""
    def limit():
        if memory_limit_gb:
            size = int(memory_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (size, size))

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, cwd=REPO, preexec_fn=limit,
                                env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read().decode(), err.read().decode(), usage.ru_maxrss * 1024


def measure(model: Path, variant: str, prompt_tokens: int, decode_tokens: int, timeout: float,
            memory_limit_gb: float | None) -> dict:
    args = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, str(model),
            "--prompt-tokens", str(prompt_tokens), "--decode-tokens", str(decode_tokens)]
    code, out, err, peak = spawn(args, timeout, memory_limit_gb)
    if code != 0:
        reason = (err.strip().splitlines() or [f"exit status {code}"])[-1][:300]
        return {"variant": variant, "failed": reason, "peak_rss_mb": peak / 2**20,
                "memory_limit_gb": memory_limit_gb, "timeout_s": timeout}
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_mb": peak / 2**20}


def best_of(runs: list[dict]) -> dict:
    """One row for repeated runs: each rate at its best run (listing every run's), the shortest session start,
    the largest peak RSS."""
    done = [r for r in runs if "failed" not in r]
    if not done:
        return runs[0]
    best = dict(max(done, key=lambda r: r["decode_tokens_per_s"]))
    best["runs"] = len(runs)
    best["decode_tokens_per_s_all"] = [r["decode_tokens_per_s"] for r in done]
    best["prefill_tokens_per_s_all"] = [r["prefill_tokens_per_s"] for r in done]
    best["session_start_s_all"] = [r["session_start_s"] for r in done]
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return best_rates(best)


def best_rates(row: dict) -> dict:
    """A repeated row's rates and session start taken at their best runs (from the lists best_of keeps)."""
    if "prefill_tokens_per_s_all" in row:
        row["prefill_tokens_per_s"] = max(row["prefill_tokens_per_s_all"])
    if "session_start_s_all" in row:
        row["session_start_s"] = min(row["session_start_s_all"])
    return row


# ----------------------------------------------------------------------------------------------- models


def dense_copy(onnx_path: Path, out_dir: Path) -> Path:
    """The same graph with each SageBinaryGemm replaced by MatMul(X, Ŵᵀ) on a float32 initializer (then an Add of
    the node's bias, input 9 since contract v2, where it has one)."""
    import onnx
    from onnx import helper, numpy_helper

    from sage_export.format.sage_layout import PackedLinear, TENSOR_NAMES, dequantize

    model = onnx.load(str(onnx_path))
    inits = {t.name: t for t in model.graph.initializer}
    used = set()
    nodes = []
    for node in model.graph.node:
        if node.op_type != "SageBinaryGemm":
            kept = onnx.NodeProto()
            kept.CopyFrom(node)  # a copy: the graph's node list is cleared below
            nodes.append(kept)
            continue
        attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
        packed_inputs = node.input[1:1 + len(TENSOR_NAMES)]  # X is input 0, the optional bias comes after
        bias = node.input[1 + len(TENSOR_NAMES)] if len(node.input) > 1 + len(TENSOR_NAMES) else ""
        tensors = {name: numpy_helper.to_array(inits[src]) for name, src in zip(TENSOR_NAMES, packed_inputs)}
        weight = dequantize(PackedLinear.from_tensors(tensors, **attrs))
        weight_name = f"{node.name}/weight_t"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), weight_name))
        used.update(packed_inputs)
        x, out = node.input[0], node.output[0]
        if bias:
            nodes.append(helper.make_node("MatMul", [x, weight_name], [f"{node.name}/product"], name=node.name))
            nodes.append(helper.make_node("Add", [f"{node.name}/product", bias], [out], name=f"{node.name}/bias"))
        else:
            nodes.append(helper.make_node("MatMul", [x, weight_name], [out], name=node.name))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    keep = [t for t in model.graph.initializer if t.name not in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    del model.functions[:]
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out_dir / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data")
    return out_dir / "model.onnx"


def random_layer(rng: np.random.Generator, n: int, k: int, groups: int, density: float):
    """A valid packed layer (canonical zeros at salient positions) drawn directly as bits: fast at any size."""
    from sage_export.format.sage_layout import pack_sage, salient_q_limit

    limit = salient_q_limit(4)
    return pack_sage(signs=rng.random((n, k)) < 0.5, group_index=rng.integers(0, groups, (n, k)),
                     group_scales=np.sort(rng.uniform(0.005, 0.05, groups)),
                     salient_mask=rng.random((n, k)) < density,
                     salient_q=rng.integers(-limit, limit + 1, (n, k)), salient_scale=rng.uniform(0.01, 0.1, n),
                     salient_bits=4, row_scales=rng.uniform(0.5, 2.0, n))


def qwen2_shape_export(out_dir: Path, seed: int = 0) -> Path:
    """Export a Qwen2-0.5B-shaped decoder with random weights (see the module docstring)."""
    from transformers import Qwen2Config

    from sage_export.models.architectures import QWEN2
    from sage_export.onnx.export import export_decoder_onnx

    config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                         rms_norm_eps=1e-6, tie_word_embeddings=True)
    rng = np.random.default_rng(seed)
    shapes = {"q_proj": (896, 896), "k_proj": (128, 896), "v_proj": (128, 896), "o_proj": (896, 896),
              "gate_proj": (4864, 896), "up_proj": (4864, 896), "down_proj": (896, 4864)}
    packed = {}
    for i in range(config.num_hidden_layers):
        for linear in QWEN2.linears:
            kind = linear.split(".")[-1]
            packed[f"model.layers.{i}.{linear}"] = random_layer(rng, *shapes[kind], *QWEN_PACKING[kind])

    def tensors(name: str):
        if name == "model.embed_tokens.weight":
            return rng.normal(0, 0.02, (151936, 896)).astype(np.float32)
        if name.endswith("norm.weight"):
            return np.ones(896, np.float32)
        if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            return rng.normal(0, 0.02, packed[name[:-len(".bias")]].out_features).astype(np.float32)
        return None

    out_dir.mkdir(parents=True, exist_ok=True)
    return export_decoder_onnx(config, QWEN2, packed, tensors, out_dir).onnx_path


# ----------------------------------------------------------------------------------------------- acceptance runs


def generate_run(artifact: Path, env: dict, timeout: float) -> dict:
    """`sage-export generate` on the default output, as a user runs it."""
    args = [sys.executable, "-m", "sage_export.cli", "generate", str(artifact), "--prompt",
            "The capital of France is", "--max-new-tokens", "48"]
    t0 = time.perf_counter()
    code, out, err, peak = spawn(args, timeout, env=env)
    wall = time.perf_counter() - t0
    summary = next((line for line in err.splitlines() if line.startswith("[session start")), "")
    rate = re.search(r"more tokens at ([0-9.]+) tokens/s", summary)
    return {"command": "sage-export generate " + " ".join(args[4:]), "env": env, "exit": code, "wall_s": wall,
            "peak_rss_mb": peak / 2**20, "summary": summary, "text": out.strip()[:200],
            "decode_tokens_per_s": float(rate.group(1)) if rate else None}


# The default run's ORT check step, as `sage-export model` runs it after quantizing: the torch model holds the
# decoded weights and float16-rounded float parts of the default output's checkpoint, the export is redone into a
# temporary folder, and run_checks (no eval text) is timed alone.
ORT_CHECK_STEP = """
import gc, json, sys, tempfile, time
from pathlib import Path
from sage_export.format.checkpoint import load_checkpoint
from sage_export.materialize import apply_dequantized
from sage_export.models import load_model
from sage_export.onnx.export import export_quantized_onnx
from sage_export.onnx.ort_check import run_checks
from sage_export.pipeline.artifact import round_float_params
loaded = load_model(None)
packed = load_checkpoint(sys.argv[1]).packed_linears()
apply_dequantized(loaded.model, packed)
round_float_params(loaded.model, list(packed), "float16")
result = export_quantized_onnx(loaded.model, loaded.architecture, packed, Path(tempfile.mkdtemp()))
def release():
    loaded.model = None
    gc.collect()
t = time.perf_counter()
checks = run_checks(result, loaded.model, loaded.tokenizer, release_torch=release)
print(json.dumps({"seconds": time.perf_counter() - t, "session": checks["session"], "failures": checks["failures"]}))
"""


def ort_check_step(checkpoint: Path, use_library: bool, timeout: float) -> dict:
    """Seconds of the default run's ORT check step (run_checks), with or without the library."""
    code, out, err, peak = spawn([sys.executable, "-c", ORT_CHECK_STEP, str(checkpoint)], timeout,
                                 env={"SAGE_ORT_OP": "1" if use_library else "0"})
    if code != 0:
        return {"failed": err.strip().splitlines()[-1][:300]}
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_mb": peak / 2**20}


# ----------------------------------------------------------------------------------------------- report


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    import onnxruntime

    from sage_export.runtime import ort_op

    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "avx512f": " avx512f" in flags,
            "avx2": " avx2" in flags, "load_average_at_start": os.getloadavg(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "library": ort_op.describe()}


def fmt(value, spec=".1f") -> str:
    return "—" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    lines = ["# ONNX Runtime on the CPU: function body, folded, custom op, FP32", "",
             f"Measured {report['date']} on {report['machine']['cpu']}, {report['machine']['cores']} cores (load "
             f"average at start {', '.join(f'{x:.1f}' for x in report['machine']['load_average_at_start'])}: the "
             f"machine is shared), ONNX Runtime {report['machine']['onnxruntime']}, library: "
             f"{report['machine']['library']}.", "", f"Command: `{report['command']}`", "",
             report["notes"], ""]
    for model in report["models"]:
        lines += [f"## {model['name']}", "", model["about"], "",
                  "| variant | session start (s) | prefill tokens/s | decode tokens/s | peak RSS (MB) | note |",
                  "|---|---|---|---|---|---|"]
        for row in model["rows"]:
            note = (f"failed with the address space capped at {row['memory_limit_gb']:g} GB: {row['failed']}"
                    if "failed" in row else
                    f"{row['prompt_tokens']} prompt tokens, {row['decode_tokens']} decoded"
                    + (f"; best of {row['runs']} runs (decode "
                       f"{', '.join(f'{v:.1f}' for v in row['decode_tokens_per_s_all'])}; prefill "
                       f"{', '.join(f'{v:.0f}' for v in row['prefill_tokens_per_s_all'])})"
                       if row.get("runs", 1) > 1 else ""))
            lines.append(f"| {row['variant']} | {fmt(row.get('session_start_s'), '.2f')} | "
                         f"{fmt(row.get('prefill_tokens_per_s'))} | {fmt(row.get('decode_tokens_per_s'), '.2f')} | "
                         f"{fmt(row.get('peak_rss_mb'), ',.0f')} | {note} |")
        lines.append("")
    acc = report.get("acceptance")
    if acc:
        lines += ["## The default output (out/smollm2)", "", "| what | with the library | function body |",
                  "|---|---|---|"]
        gen, gen_fb = acc["generate"], acc["generate_function_body"]
        lines.append(f"| `sage-export generate` decode tokens/s | {fmt(gen['decode_tokens_per_s'])} | "
                     f"{fmt(gen_fb['decode_tokens_per_s'], '.2f')} |")
        lines.append(f"| its wall time (s), 48 tokens | {fmt(gen['wall_s'])} | {fmt(gen_fb['wall_s'])} |")
        lines.append(f"| its peak RSS (MB) | {fmt(gen['peak_rss_mb'], ',.0f')} | {fmt(gen_fb['peak_rss_mb'], ',.0f')} |")
        step, step_fb = acc["ort_check_step"], acc["ort_check_step_function_body"]
        lines.append(f"| the default run's ORT check step, run_checks (s) | {fmt(step.get('seconds'))} | "
                     f"{fmt(step_fb.get('seconds'))} |")
        lines += ["", f"Generated: {gen['text']!r}", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs=2, metavar=("VARIANT", "MODEL"), help=argparse.SUPPRESS)
    p.add_argument("--smollm2", type=Path, default=REPO / "out" / "smollm2", help="a `sage-export model` output")
    p.add_argument("--qwen-dir", type=Path, default=REPO / "out" / "bench_ort" / "qwen2_0.5b_shape")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--slow-decode-tokens", type=int, default=4, help="decode steps of the function-body variants")
    p.add_argument("--memory-limit-gb", type=float, default=16.0,
                   help="address-space cap of each run (a folded session that needs more fails and says so)")
    p.add_argument("--repeats", type=int, default=3, help="runs of the custom-op and fp32 variants (best kept)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--skip-qwen", action="store_true")
    p.add_argument("--acceptance-only", action="store_true", help="only the default output's generate/ORT check")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "ort_cpu")
    p.add_argument("--render", action="store_true", help="only rewrite the .md from the existing .json")
    args = p.parse_args(argv)
    if args.render:
        report = json.loads(args.out.with_suffix(".json").read_text())
        report["notes"] = NOTES
        for model in report["models"]:
            model["rows"] = [best_rates(row) for row in model["rows"]]
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        args.out.with_suffix(".md").write_text(markdown(report))
        return 0
    if args.worker:
        variant, model = args.worker
        print(json.dumps(run_worker(Path(model), variant, args.prompt_tokens, args.decode_tokens, 0)))
        return 0

    command = "python tools/bench_ort.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"date": datetime.date.today().isoformat(), "command": command.strip(), "machine": machine(),
              "notes": NOTES, "models": []}
    if args.acceptance_only:
        args.skip_qwen = True
    work = REPO / "out" / "bench_ort"
    smollm2 = args.smollm2 / "onnx" / "model.onnx"
    models = [("SmolLM2-135M (the default `sage-export model` output)", smollm2, work / "smollm2_fp32",
               "The default run's export: 210 SageBinaryGemm nodes, 3.20 true bits; float parts float16.")]
    if not args.skip_qwen:
        qwen = args.qwen_dir / "model.onnx"
        if not qwen.is_file():
            print("exporting the Qwen2-0.5B-shaped model ...", flush=True)
            qwen2_shape_export(args.qwen_dir)
        models.append(("Qwen2-0.5B shape, synthetic random weights", qwen, work / "qwen2_fp32",
                       "Synthetic: Qwen2-0.5B's exact shapes (168 SageBinaryGemm nodes, 358 M quantized weights, "
                       "vocab 151,936) with random weights packed at SmolLM2's per-type G and salient density."))
    for name, onnx_path, fp32_dir, about in ([] if args.acceptance_only else models):
        fp32 = fp32_dir / "model.onnx"
        if not fp32.is_file():
            print(f"writing the float32 copy of {onnx_path} ...", flush=True)
            dense_copy(onnx_path, fp32_dir)
        rows = {variant: [] for variant in VARIANTS}
        # The fast variants run --repeats times, interleaved, so that the machine's load (it is shared) falls on
        # each alike; the table keeps each rate's best run and lists all of them.
        for repeat in range(args.repeats):
            for variant in VARIANTS:
                slow = variant.startswith("function_body")
                if slow and repeat:
                    continue
                row = measure(fp32 if variant == "fp32" else onnx_path, variant, args.prompt_tokens,
                              args.slow_decode_tokens if slow else args.decode_tokens, args.timeout,
                              args.memory_limit_gb)
                print(name, json.dumps(row), flush=True)
                rows[variant].append(row)
        rows = [best_of(runs) for runs in rows.values()]
        report["models"].append({"name": name, "about": about, "onnx": str(onnx_path), "rows": rows})
    report["acceptance"] = {
        "generate": generate_run(args.smollm2, {}, args.timeout),
        "generate_function_body": generate_run(args.smollm2, {"SAGE_ORT_OP": "0"}, args.timeout),
        "ort_check_step": ort_check_step(args.smollm2 / "checkpoint", True, args.timeout),
        "ort_check_step_function_body": ort_check_step(args.smollm2 / "checkpoint", False, args.timeout),
    }
    print(json.dumps(report["acceptance"], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 0


NOTES = ("Each variant runs in a fresh process; peak RSS is that process's maximum resident set (Python, NumPy, "
         "ONNX Runtime and the torch import of sage_export included), from wait4. Prefill: one call on random "
         "prompt tokens (empty cache). Decode: greedy steps with the KV cache after that prefill; the function-body "
         "variants run fewer steps (--slow-decode-tokens) because each takes seconds. The fp32 rows replace each "
         "SageBinaryGemm by a float32 MatMul of its decoded weight in the same graph, i.e. the unquantized model's "
         "compute in ONNX Runtime. The custom-op and fp32 variants run 3 times, interleaved (the machine is shared): "
         "each rate is its best run, every run is listed. Threads: ONNX Runtime's defaults (one per core), spinning off, as "
         "sage_export.onnx.ort_check.make_session makes every session.")

if __name__ == "__main__":
    sys.exit(main())
