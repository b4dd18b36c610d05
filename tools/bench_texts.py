#!/usr/bin/env python3
"""Perplexity of one model, unquantized and quantized, on several texts: WikiText-2 and the stdlib code text.

    python tools/make_code_text.py --out out/code_text
    python tools/bench_texts.py --model ~/.cache/sage-export/qwen-coder/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf \\
        --text wiki:../shared/data/wikitext2/wiki.test.raw --text code:out/code_text/code.test.txt \\
        --variants fp rtn:bits=4,group_size=128 --ctx 2048 --windows 2 --out benchmarks/qwen_coder_fp_rtn.json

Variants are named as in tools/bench_quality.py (`fp`, `rtn:bits=4,group_size=128`, `sage:preset=v2,bits=3.2`).
Calibrated variants (SAGE v2) are calibrated as `sage-export model` does by default: 32 × 128 tokens the model samples
itself from the unquantized model, seeded by --seed; `--calib-text FILE` takes random windows of FILE instead (never
one of the --text files), `--calib-samples`/`--calib-seqlen` change the size. A quantized row records its calibration
and, for SAGE, the chosen G and true bits per layer type (`layers_by_type`; `--layers-out DIR` also writes every
layer's stats). Each text is tokenized once and cut into the first `--windows` non-overlapping windows of
`--ctx` tokens (sage_export/eval/perplexity.py). `wiki:FILE` is read the WikiText way (lines joined with blank
lines), `code:FILE` exactly as written. The model is quantized in place (no second float32 copy: a 1.5B model is
7 GB), so `fp` runs first and each further quantized variant reloads the model. Rows (keyed by model, variant,
text, ctx and windows) are merged into --out and the .md beside it is rewritten from the whole JSON (with
`--render-only`, from the JSON alone; `--note TEXT`, repeated, sets the notes printed under the table).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from bench_quality import git_commit, machine_name, parse_variant  # noqa: E402
from sage_export.eval.code_text import read_code_text  # noqa: E402
from sage_export.eval.perplexity import perplexity, read_eval_text, tokenize_text  # noqa: E402
from sage_export.models import load_model  # noqa: E402

READERS = {"wiki": read_eval_text, "code": read_code_text}


def parse_text(spec: str) -> tuple[str, Path]:
    kind, sep, path = spec.partition(":")
    if not sep or kind not in READERS:
        raise argparse.ArgumentTypeError(f"--text takes wiki:FILE or code:FILE, got {spec!r}")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    return kind, Path(path)


def quantize(loaded, method, seed: int, calib=None, calib_info: dict | None = None,
             layers_out: Path | None = None, validation=None) -> dict:
    from sage_export.pipeline.quantize import quantize_model
    from sage_export.report.build import bits_summary, layer_rows

    qmodel = quantize_model(loaded, method, seed, calib, calib_info, validation=validation)
    layers = layer_rows(qmodel.layers)
    bits = bits_summary(layers)
    out = {"true_bits": bits["true_bits"], "paper_weight_bits": bits["paper_weight_bits"],
           "paper_scale_bits": bits["paper_scale_bits"], "n_layers": bits["n_layers"],
           "n_weights": bits["n_weights"], "quant_time_s": round(qmodel.time_s, 1),
           "layers_by_type": layers_by_type(layers)}
    if qmodel.calibration:
        out["calibration"] = qmodel.calibration
    if qmodel.budget:
        out["budget"] = {k: qmodel.budget[k] for k in ("budget_bits", "planned_bits", "true_bits", "timings")
                         if k in qmodel.budget}
    if layers_out is not None:
        layers_out.mkdir(parents=True, exist_ok=True)
        keep = ("name", "out_features", "in_features", "true_bits", "n_groups", "graph_groups", "realised_rho",
                "rel_error", "sensitivity", "bits", "group_size")
        name = method.label + ("" if not qmodel.calibration else "." + calib_label(out).replace(" ", "_"))
        (layers_out / f"{name}.json").write_text(json.dumps(
            [{k: r[k] for k in keep if k in r} for r in layers], indent=0, default=float) + "\n")
    return out


def calib_label(row: dict) -> str:
    info = row.get("calibration")
    if not info:
        return "—"
    if info.get("source") == "self-generated":  # plain "self-sampled": from BOS (every row before 2026-12-06)
        source = "self-sampled+prompts" if info.get("start") == "prompts" else "self-sampled"
    else:
        source = Path(info["text"]).name
    return f"{source} {info['samples']}×{info['seqlen']}"


def row_key(row: dict) -> tuple:
    return row["model"], row["variant"], calib_label(row), row["text"], row["ctx"], row["n_windows"]


def layers_by_type(rows: list[dict]) -> dict:
    """Per layer type (q_proj, ..., down_proj): how many matrices took each G, and their true bits (weighted by
    weights: min, mean, max)."""
    out: dict = {}
    for kind in dict.fromkeys(r["name"].rsplit(".", 1)[-1] for r in rows):
        group = [r for r in rows if r["name"].rsplit(".", 1)[-1] == kind]
        sizes = [r["out_features"] * r["in_features"] for r in group]
        g_counts: dict = {}
        for r in group:
            if "n_groups" in r:
                g_counts[str(r["n_groups"])] = g_counts.get(str(r["n_groups"]), 0) + 1
        out[kind] = {"n": len(group), "shape": [group[0]["out_features"], group[0]["in_features"]],
                     "G": dict(sorted(g_counts.items(), key=lambda kv: int(kv[0]))),
                     "true_bits_mean": sum(r["true_bits"] * n for r, n in zip(group, sizes)) / sum(sizes),
                     "true_bits_min": min(r["true_bits"] for r in group),
                     "true_bits_max": max(r["true_bits"] for r in group),
                     "weight_share": sum(sizes)}
        if any("realised_rho" in r for r in group):
            out[kind]["rho_mean"] = sum(r.get("realised_rho", 0.0) for r in group) / len(group)
    total = sum(v["weight_share"] for v in out.values())
    for v in out.values():
        v["weight_share"] = v["weight_share"] / total
    return out


def merge(path: Path, new_rows: list[dict]) -> list[dict]:
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    keys = {row_key(r) for r in new_rows}
    return sorted([r for r in rows if row_key(r) not in keys] + new_rows,
                  key=lambda r: (r["model"], r["text"], -r["n_windows"], r.get("true_bits", 0), r["variant"]))


def render_md(doc: dict) -> str:
    rows = doc["rows"]
    out = ["# Perplexity on WikiText-2 and on code", "",
           "Each row: the model (GGUF dequantized to float32), the text, non-overlapping windows of ctx tokens "
           "from the start of the tokenized text, PPL = exp(mean token NLL over the (ctx − 1) predictions of each "
           "window). *true bits*: every stored byte of the quantized decoder Linear layers × 8 / weights (embeddings, "
           "lm_head and norms stay float32). Code text: Python's standard library, the dev or test half as named "
           "(sage_export/eval/code_text.py; its sha256 and Python version are in each row). Written by "
           "tools/bench_texts.py from the JSON beside this file.", "",
           "| model | text | windows × ctx | tokens | variant | calibration | PPL | true bits | quant time "
           "| eval time |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bits = f"{r['true_bits']:.3f}" if "true_bits" in r else "32 (FP)"
        qt = f"{r['quant_time_s']:.0f} s" if "quant_time_s" in r else "—"
        out.append(f"| {r['model_name']} | {r['text']} | {r['n_windows']} × {r['ctx']} | {r['n_tokens']:,} | "
                   f"{r['variant']} | {calib_label(r)} | {r['ppl']:.3f} | {bits} | {qt} | {r['eval_time_s']:.0f} s |")
    typed = {(r["variant"], calib_label(r)): r for r in rows if r.get("layers_by_type")
             and r["method"]["name"] == "sage"}
    for (variant, calib), r in typed.items():
        out += ["", f"Chosen G and true bits per layer type: {variant}, calibration {calib} "
                f"({r['true_bits']:.3f} true bits over all {r['n_layers']} matrices):", "",
                "| layer | N×K | matrices | share of weights | G used (matrices) | true bits: mean | min | max "
                "| mean ρ |",
                "|---|---|---|---|---|---|---|---|---|"]
        order = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        kinds = sorted(r["layers_by_type"], key=lambda k: (order.index(k) if k in order else len(order), k))
        for kind in kinds:  # the JSON keeps its keys sorted: the model's order is restored here
            t = r["layers_by_type"][kind]
            g = ", ".join(f"G={k}: {v}" for k, v in sorted(t["G"].items(), key=lambda kv: int(kv[0])))
            rho = f"{t['rho_mean']:.4f}" if "rho_mean" in t else "—"
            out.append(f"| {kind} | {t['shape'][0]}×{t['shape'][1]} | {t['n']} | {100 * t['weight_share']:.1f} % | "
                       f"{g} | {t['true_bits_mean']:.3f} | {t['true_bits_min']:.3f} | {t['true_bits_max']:.3f} | "
                       f"{rho} |")
    if doc.get("notes"):
        out += ["", "Notes:", ""] + [f"- {note}" for note in doc["notes"]]
    out += ["", "Texts:", ""]
    out += sorted({f"- `{r['text']}`: {r['text_chars']:,} chars, {r['text_tokens']:,} tokens, sha256 "
                   f"`{r['text_sha256']}`" + (f", Python {r['python_version']} stdlib" if r.get("python_version")
                                              else "") for r in rows})
    out += ["", "Measured with:", ""]
    out += sorted({f"- `{r['command']}` ({r['machine']}, {r['date']}, commit {r['commit']})" for r in rows})
    return "\n".join(out) + "\n"


def text_entry(kind: str, path: Path, tokenizer) -> dict:
    text = READERS[kind](path)
    start = time.perf_counter()
    ids = tokenize_text(tokenizer, text)
    entry = {"kind": kind, "name": f"{kind}:{path.name}", "ids": ids, "chars": len(text),
             "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "tokenize_s": time.perf_counter() - start}
    manifest = path.parent / "code.manifest.json"
    if kind == "code" and manifest.is_file():
        entry["python_version"] = json.loads(manifest.read_text()).get("python_version")
    return entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a .gguf file or Hugging Face directory")
    p.add_argument("--text", type=parse_text, action="append", metavar="wiki:FILE|code:FILE")
    p.add_argument("--variants", nargs="+", default=["fp"])
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-text", type=Path, help="calibration text of calibrated variants (default: self-sampled)")
    p.add_argument("--calib-from", choices=["prompts", "bos"], default="prompts",
                   help="self-sampled calibration after built-in prompts (default) or from BOS")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=128)
    p.add_argument("--layers-out", type=Path, help="also write every quantized layer's stats to DIR/<variant>.json")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--note", action="append", help="a line for the table's notes (replaces the notes in --out)")
    p.add_argument("--render-only", action="store_true", help="measure nothing: rewrite the .md from the JSON")
    args = p.parse_args(argv)
    if args.render_only:
        doc = json.loads(args.out.read_text())
        write(args.out, doc, merge(args.out, []), args.note)
        return 0
    if not args.model or not args.text:
        p.error("--model and --text are required (or --render-only)")
    methods = [parse_variant(v) for v in args.variants]
    if args.calib_text is not None:
        if not args.calib_text.is_file():
            p.error(f"no such calibration text: {args.calib_text}")
        if any(args.calib_text.resolve() == path.resolve() for _, path in args.text):
            p.error("the calibration text must not be one of the evaluation texts")
    stamp = {"machine": machine_name(), "date": dt.date.today().isoformat(), "commit": git_commit(),
             "command": "python tools/bench_texts.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    loaded, texts, dirty = None, None, True
    calib, calib_info, validation = None, None, None
    for method in methods:
        if dirty:
            start = time.perf_counter()
            loaded = load_model(args.model)
            print(f"loaded {loaded.source.description} in {time.perf_counter() - start:.1f} s", flush=True)
            dirty = False
        if texts is None:
            texts = [text_entry(kind, path, loaded.tokenizer) for kind, path in args.text]
            for t in texts:
                print(f"{t['name']}: {t['chars']:,} chars -> {t['ids'].numel():,} tokens "
                      f"({t['tokenize_s']:.1f} s)", flush=True)
        if method.needs_calibration and calib is None:  # from the unquantized model, once
            from sage_export.pipeline.calibration import calibration_tokens

            calib, calib_info = calibration_tokens(loaded, args.calib_text, args.calib_samples, args.calib_seqlen,
                                                   args.seed, prompted=args.calib_from == "prompts")
            print(f"calibration: {calib_info}", flush=True)
        if method.preset == "v2" and method.sage_recipe().needs_validation and validation is None:
            from sage_export.pipeline.calibration import validation_tokens
            from sage_export.pipeline.guard import held_out_rows

            rows = held_out_rows(args.calib_samples)  # as many as a sage-export run samples
            validation = validation_tokens(loaded, args.calib_text, rows, args.calib_seqlen, args.seed,
                                           prompted=args.calib_from == "prompts")
            calib_info = dict(calib_info, validation_samples=rows)
        base = {"variant": method.label, "method": method.to_dict(), "model": str(loaded.source.description),
                "model_name": Path(args.model).name, "ctx": args.ctx}
        if method.name != "fp":
            base.update(quantize(loaded, method, args.seed, calib if method.needs_calibration else None,
                                 calib_info if method.needs_calibration else None, args.layers_out,
                                 validation if method.preset == "v2" else None))
            dirty = True
            print(f"{method.label}: {base['true_bits']:.3f} true bits, quantized in {base['quant_time_s']} s",
                  flush=True)
        rows = []
        for t in texts:
            start = time.perf_counter()
            res = perplexity(loaded.model, t["ids"], args.ctx, args.windows, text=t["name"])
            row = dict(base, text=t["name"], text_chars=t["chars"], text_tokens=int(t["ids"].numel()),
                       text_sha256=t["sha256"], ppl=res.ppl, nll=res.nll, n_windows=res.n_windows,
                       n_tokens=res.n_tokens, window_nll=res.window_nll,
                       eval_time_s=round(time.perf_counter() - start, 1), **stamp)
            if t.get("python_version"):
                row["python_version"] = t["python_version"]
            rows.append(row)
            print(f"{method.label} on {t['name']} ({res.n_windows} x {args.ctx}): ppl {res.ppl:.3f} "
                  f"({row['eval_time_s']} s)", flush=True)
        old = json.loads(args.out.read_text()) if args.out.is_file() else {}
        write(args.out, old, merge(args.out, rows), args.note)
    return 0


def write(path: Path, old: dict, rows: list[dict], notes: list[str] | None) -> None:
    """The JSON (rows, and the notes: the new ones when given, else the old) and the .md rendered from it."""
    doc = {"rows": rows}
    if notes or old.get("notes"):
        doc["notes"] = notes or old["notes"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    path.with_suffix(".md").write_text(render_md(doc))


if __name__ == "__main__":
    sys.exit(main())
