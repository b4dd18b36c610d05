#!/usr/bin/env python3
"""Wall time and peak memory of every stage of `sage-export model` on random-weight models of real shapes.

    python tools/bench_scale.py                                  # every shape below, --preset paper
    python tools/bench_scale.py --preset v2 --out benchmarks/scale_v2 --shapes llama2-7b-2l llama2-7b-4l
    python tools/bench_scale.py --shapes smollm2-135m llama2-7b-2l llama2-7b-4l
    python tools/bench_scale.py --render-only                    # table and plot from benchmarks/scale.json

Each shape is written as a Hugging Face directory (float16 safetensors, random normal weights with std 0.02, unit
norms, a small byte-level BPE tokenizer), then run through the real command in its own process: `python -m
sage_export.cli model DIR --out OUT --preset PRESET --stream yes` (these models are small enough for `--stream auto`
to keep them in memory; a real 7B model streams under auto). The command's report gives each stage's seconds and
peak memory (process + workers, sampled every 0.2 s); /usr/bin/time gives the whole run's wall time and the main
process's peak. A run that fails (out of memory included) is recorded with its exit status and last line.

The weights are random, so perplexity and text mean nothing here: this measures time and memory only. LLaMA-2-7B
is run at 2 and 4 layers of its real layer shapes; the 32-layer figures in the table are a straight line through
those two points, stated as an extrapolation.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from bench_default import parse_time_log  # noqa: E402
from bench_quality import machine_name  # noqa: E402

OUT = REPO / "benchmarks" / "scale"

# model_type, hidden, intermediate, layers, heads, kv heads, vocabulary, tied embeddings
SHAPES = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=False),
    "llama-1.1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    "llama2-7b-2l": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "llama2-7b-4l": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=4,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
}
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)  # for the tool's own test
# In the order a run takes them; calibration_text and the guard's two scores (FP and RTN, then the result) are the
# v2 preset's only.
STAGES = ("load", "calibration_text", "guard_fp_rtn", "quantize", "guard_result", "write_checkpoint", "samples",
          "onnx_export", "ort_check")
EXTRAPOLATE = ("llama2-7b-2l", "llama2-7b-4l", 32)


def tensor_shapes(shape: dict) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} of a llama/qwen2 decoder, as transformers names them."""
    h, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    out = {"model.embed_tokens.weight": (v, h)}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f)})
        if shape["model_type"] == "qwen2":  # qwen2's q/k/v projections carry biases
            out.update({p + "self_attn.q_proj.bias": (h,), p + "self_attn.k_proj.bias": (kv,),
                        p + "self_attn.v_proj.bias": (kv,)})
    out["model.norm.weight"] = (h,)
    if not shape["tie_word_embeddings"]:
        out["lm_head.weight"] = (v, h)
    return out


def parameter_counts(shape: dict) -> tuple[int, int]:
    """(all parameters, parameters of the quantized Linear layers)."""
    shapes = tensor_shapes(shape)
    total = sum(int(np.prod(s)) for s in shapes.values())
    linear = sum(int(np.prod(s)) for n, s in shapes.items() if ".layers." in n and n.endswith("proj.weight"))
    return total, linear


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["The capital of France is Paris. The theory of relativity. A cup of tea."] * 8,
                            trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)


def write_model(folder: Path, shape: dict, seed: int = 0, shard_bytes: int = 2 << 30) -> None:
    """A random float16 checkpoint of `shape`, written shard by shard so this process holds one shard at most."""
    from safetensors.numpy import save_file
    from transformers import AutoConfig

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in shape.items() if k != "model_type"}
    AutoConfig.for_model(shape["model_type"], **cfg, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         max_position_embeddings=4096).save_pretrained(folder)
    write_tokenizer(folder)
    rng = np.random.default_rng(seed)
    shards, current, size = [], {}, 0
    for name, s in tensor_shapes(shape).items():
        if name.endswith("norm.weight"):
            current[name] = np.ones(s, np.float16)
        else:
            current[name] = (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(np.float16)
        size += current[name].nbytes
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    index = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        index.update({name: file for name in shard})
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))


def run_shape(name: str, shape: dict, work: Path, preset: str, timeout_s: int) -> dict:
    model_dir, out_dir = work / name / "model", work / name / "out"
    write_model(model_dir, shape)
    cmd = [sys.executable, "-m", "sage_export.cli", "model", str(model_dir), "--out", str(out_dir),
           "--preset", preset, "--stream", "yes", "--force"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=REPO, env=env,
                              timeout=timeout_s)
        rc, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        rc, stderr = "timeout", f"did not finish in {timeout_s} s"
    total, linear = parameter_counts(shape)
    row = {"shape": name, "config": shape, "params": total, "quantized_params": linear, "preset": preset,
           "exit_status": rc, "command": f"sage-export model DIR --out OUT --preset {preset} --stream yes",
           "code": code_version()}
    if "Elapsed (wall clock)" in stderr:
        row.update(parse_time_log(stderr))
    report = out_dir / "report.json"
    if rc == 0 and report.is_file():
        rep = json.loads(report.read_text())
        row.update(stages_s=rep["timings"], stages_peak_mb=rep.get("peak_rss_mb", {}),
                   true_bits=rep["bits"]["true_bits"], ort_failures=rep["onnx"]["checks"]["failures"],
                   onnx_data_bytes=rep["onnx"]["export"]["data_bytes"])
    else:
        lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("\t")]
        row["error"] = lines[-1][:300] if lines else f"exit status {rc}"
    shutil.rmtree(work / name, ignore_errors=True)
    return row


def code_version(checkout: Path = REPO) -> str:
    """The commit the measured code is at, marked when sage_export/ has uncommitted changes: rows measured at
    different commits sit in one table, and memory figures change with the code."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=checkout, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--", "sage_export") else "")


def extrapolation(rows: dict) -> dict | None:
    """Per-layer cost and straight lines to 32 layers from the 7B rows at 2 and 4 layers. Memory is extrapolated
    stage by stage (a stage that grows faster overtakes the one that peaks at 2 and 4 layers); the peak at 32
    layers is the largest of those lines."""
    a, b, layers = EXTRAPOLATE
    if not all(rows.get(k, {}).get("exit_status") == 0 for k in (a, b)):
        return None
    ra, rb = rows[a], rows[b]
    if ra.get("code") != rb.get("code"):  # a slope between two versions of the code measures the change, not a layer
        return None
    per_layer_s = (rb["wall_s"] - ra["wall_s"]) / 2
    per_layer_mb = (rb["peak_rss_mb_tree"] - ra["peak_rss_mb_tree"]) / 2
    block_f32_mb = (rb["quantized_params"] - ra["quantized_params"]) / 2 * 4 / 2**20
    stage_slope = {s: (rb["stages_peak_mb"][s] - ra["stages_peak_mb"][s]) / 2 for s in ra["stages_peak_mb"]
                   if s in rb["stages_peak_mb"]}
    stage_peak = {s: ra["stages_peak_mb"][s] + (layers - 2) * slope for s, slope in stage_slope.items()}
    top = max(stage_peak, key=stage_peak.get)
    return {"per_layer_s": round(per_layer_s, 1), "per_layer_peak_mb": round(per_layer_mb, 1),
            "block_float32_mb": round(block_f32_mb, 1), "layers": layers,
            "wall_s": round(ra["wall_s"] + (layers - 2) * per_layer_s, 1),
            "stage_per_layer_mb": {s: round(v, 1) for s, v in stage_slope.items()},
            "peak_stage": top, "peak_mb": round(stage_peak[top], 1)}


def _tree_peak(row: dict) -> None:
    if row.get("stages_peak_mb"):
        row["peak_rss_mb_tree"] = max(row["stages_peak_mb"].values())


def render(data: dict, out: Path) -> None:
    rows = {r["shape"]: r for r in data["rows"]}
    md = ["# Scale: `sage-export model` on random-weight models of real shapes", "",
          f"{data['machine']}, {data['date']}. Command per shape: `{data['rows'][0]['command'] if rows else ''}` "
          "on a float16 safetensors directory written by `python tools/bench_scale.py --shapes SHAPE`; the code column "
          "is the commit each row was measured at.", "",
          "Seconds and peak memory (MB, the process and its quantization workers, sampled every 0.2 s) per stage. "
          "Random weights: time and memory only, no quality.", "",
          "| shape | params (quantized) | " + " | ".join(STAGES) + " | total wall | peak | ONNX data | result | code |",
          "|---|---|" + "---|" * len(STAGES) + "---|---|---|---|---|"]
    for name, r in rows.items():
        head = f"| {name} | {r['params'] / 1e6:,.0f} M ({r['quantized_params'] / 1e6:,.0f} M) |"
        code = f" {r.get('code', '?')} |"
        if r.get("exit_status") != 0:
            md.append(head + " |" * len(STAGES) + f" {r.get('wall_s', '–')} s | – | – | failed: {r.get('error', '')} |"
                      + code)
            continue
        cells = [f"{r['stages_s'][s]:.0f} s · {r['stages_peak_mb'][s]:,.0f}" if s in r["stages_s"] else "–"
                 for s in STAGES]
        verdict = "ORT check passed" if not r["ort_failures"] else "ORT check failed: " + "; ".join(r["ort_failures"])
        md.append(head + " " + " | ".join(cells) + f" | {r['wall_s']:.0f} s | {r['peak_rss_mb_tree']:,.0f} MB | "
                  f"{r['onnx_data_bytes'] / 2**20:,.0f} MB | {verdict} |" + code)
    ext = data.get("extrapolation")
    if ext:
        md += ["", f"LLaMA-2-7B layer shapes: each added layer costs {ext['per_layer_s']} s and "
               f"{ext['per_layer_peak_mb']:,.0f} MB of peak memory (one block in float32 is {ext['block_float32_mb']:,.0f} "
               f"MB)."]
        slopes = ", ".join(f"{s} {v:+,.0f}" for s, v in ext["stage_per_layer_mb"].items())
        md[-1] += (f" Per stage, MB per added layer: {slopes}. Straight lines to {ext['layers']} layers, stage by "
                   f"stage (extrapolated, not measured): {ext['wall_s'] / 60:.0f} min, {ext['peak_mb'] / 1024:.1f} "
                   f"GB peak, in {ext['peak_stage']}.")
    md += ["", f"![time and peak memory against parameters]({out.with_suffix('.png').name})"]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    plot(rows, out.with_suffix(".png"), data["rows"][0]["preset"] if rows else "")


def plot(rows: dict, path: Path, preset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows.values() if r.get("exit_status") == 0]
    if not ok:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["params"] / 1e6 for r in ok]
    a.scatter(x, [r["wall_s"] / 60 for r in ok])
    b.scatter(x, [r["peak_rss_mb_tree"] / 1024 for r in ok])
    for r, xi in zip(ok, x):
        a.annotate(r["shape"], (xi, r["wall_s"] / 60), fontsize=8)
        b.annotate(r["shape"], (xi, r["peak_rss_mb_tree"] / 1024), fontsize=8)
    a.set(xlabel="parameters (M)", ylabel="wall time (min)", title=f"sage-export model --preset {preset}")
    b.set(xlabel="parameters (M)", ylabel="peak memory (GB)", title="process + workers")
    for ax in (a, b):
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES) + ["tiny"])
    p.add_argument("--preset", default="paper")
    p.add_argument("--out", type=Path, default=OUT, help="writes OUT.json, OUT.md and OUT.png")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per shape")
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args(argv)
    json_path = args.out.with_suffix(".json")
    data = json.loads(json_path.read_text()) if json_path.is_file() else {"rows": []}
    if not args.render_only:
        rows = {r["shape"]: r for r in data["rows"]}
        with tempfile.TemporaryDirectory(prefix="sage-scale-") as tmp:
            for name in args.shapes:
                print(f"--- {name}", flush=True)
                row = run_shape(name, TINY if name == "tiny" else SHAPES[name], Path(tmp), args.preset, args.timeout)
                _tree_peak(row)
                rows[name] = row
                print(json.dumps({k: row.get(k) for k in ("exit_status", "wall_s", "peak_rss_mb_tree", "error")}),
                      flush=True)
                data = {"machine": machine_name(), "date": dt.date.today().isoformat(),
                        "command": "python tools/bench_scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
                        "rows": [rows[k] for k in list(SHAPES) + ["tiny"] if k in rows]}
                data["extrapolation"] = extrapolation(rows)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                json_path.write_text(json.dumps(data, indent=1) + "\n")  # after every shape: partial runs keep rows
                render(data, args.out)
    data["extrapolation"] = extrapolation({r["shape"]: r for r in data["rows"]})  # also for --render-only
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    render(data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
