"""Screen SAGE v2 recipe variants on one model without re-measuring it for each: the dev-data loop of issue 21.

`measure` runs steps 1-2 of v2 once (calibration tokens, layer statistics, every matrix's options) and saves them.
`plan` prints, instantly, where each variant's budget puts the bits (G and true bits per layer type).
`finish` quantizes a fresh copy of the model with a variant (ρ search and compensation on the saved statistics)
and scores it on the texts given. Choices are made on `--dev-text` texts; `--test-text` texts are scored in the same
run so that the chosen row needs no second quantization, and are kept apart in the JSON ("role": "test").

Variants are recipe fields, `name:key=value,...` (e.g. `floor:floor_gap=0.5`). Per-matrix settings change the
options themselves, so they are fixed at `measure` (`--matrix key=value,...`) and kept with the save; `finish
--matrix` may add fields that only act when a matrix is built (row_multipliers, row_fit_rounds).
Recipe fields that change the options themselves (activation_power) are given to `measure --recipe`; `measure
--stats-from SAVED` re-measures only the options on SAVED's calibration, seeds and statistics (minutes instead of the
sampling and the backward pass; calibration options are refused there, since they could not act).
sensitivity_power is applied to the saved measurements exactly: a matrix's errors and column weights all carry the
same factor s, so changing the power from p0 to p multiplies them by s^(p − p0).

    python tools/screen_v2.py measure --model M.gguf --out out/screen/qwen.pt
    python tools/screen_v2.py plan out/screen/qwen.pt base: floor:floor_gap=0.5
    python tools/screen_v2.py finish out/screen/qwen.pt floor:floor_gap=0.5 --model M.gguf \\
        --dev-text wiki-valid:../shared/data/wikitext2/wiki.valid.tokens --out benchmarks/screen_v2.json
    python tools/screen_v2.py table benchmarks/screen_v2.json    # -> benchmarks/screen_v2.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shlex
import sys
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sage_export.cli import CALIB_DEFAULTS  # noqa: E402  (measure calibrates like the CLI)
from sage_export.models import load_model  # noqa: E402
from sage_export.onnx.function import FUNCTION_VERSION  # noqa: E402
from sage_export.quant.config import V2_MATRIX, SageRecipe  # noqa: E402

from bench_texts import git_commit, machine_name, text_entry  # noqa: E402


def parse_variant(spec: str) -> tuple[str, dict]:
    name, _, body = spec.partition(":")
    fields = {}
    for item in filter(None, re.split(r",(?![^\[]*\])", body)):  # commas inside [..] belong to a list
        key, _, value = item.partition("=")
        fields[key] = None if value == "none" else json.loads(value)
    return name, fields


def recipe_for(base: SageRecipe | None, fields: dict) -> SageRecipe:
    """base with fields over it; base None: the defaults, as the CLI builds them (SageRecipe.from_fields)."""
    recipe = SageRecipe.from_fields(fields) if base is None else replace(base, **fields)
    recipe.validate()
    return recipe


# recipe fields the saved options were measured with
MEASURE_FIELDS = ("activation_power", "activation_power_candidates", "activation_power_bits")


def reweighted(measurements, p0: float, p: float):
    """The measurements as if taken with sensitivity power p instead of p0 (see the module docstring)."""
    if p == p0:
        return measurements
    sens = measurements.stats.sensitivity
    factor = {name: sens[name] ** (p - p0) for name in measurements.names}
    tables = [[replace(o, error=o.error * factor[name]) for o in table]
              for name, table in zip(measurements.names, measurements.tables)]
    weights = {name: None if w is None else w * factor[name] for name, w in measurements.weights.items()}
    return replace(measurements, tables=tables, weights=weights)


def restricted(measurements, group_options):
    """The measurements with only the options whose G is in group_options (a subset of what was measured)."""
    measured = {o.n_groups for table in measurements.tables for o in table}
    missing = sorted(set(group_options) - measured)
    if missing:
        raise SystemExit(f"group_options {missing} were not measured (measured: {sorted(measured)})")
    tables = [[o for o in table if o.n_groups in group_options] for table in measurements.tables]
    return replace(measurements, tables=tables)


def layer_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def allocation_summary(measurements, plan) -> dict:
    """Per layer type: G counts and mean true bits of the budget's choices."""
    groups, nbytes, sizes = defaultdict(Counter), Counter(), Counter()
    for name, option, size in zip(measurements.names, plan.allocation.choices, measurements.sizes):
        kind = layer_type(name)
        groups[kind][option.n_groups] += 1
        nbytes[kind] += option.nbytes
        sizes[kind] += size
    return {kind: {"G": dict(sorted(groups[kind].items())), "true_bits": round(8 * nbytes[kind] / sizes[kind], 3)}
            for kind in groups}


def cmd_measure(args) -> int:
    from sage_export.pipeline.calibration import calibration_tokens, validation_tokens
    from sage_export.pipeline.guard import held_out_rows
    from sage_export.pipeline.quantize import layer_seeds
    from sage_export.pipeline.sage_v2 import measure_options, measure_v2
    from sage_export.pipeline.workers import MatrixPool

    recipe = recipe_for(None, parse_variant(":" + args.recipe)[1])
    matrix_fields = parse_variant(":" + args.matrix)[1]
    cfg = replace(V2_MATRIX, **matrix_fields)
    cfg.validate()
    loaded = load_model(args.model)
    if args.stats_from:  # the calibration and statistics of an earlier measurement; only the options are new
        earlier = load_saved(args.stats_from)
        calib_info, seeds, args.seed = earlier["calib_info"], earlier["seeds"], earlier["seed"]
        validation = earlier.get("validation")
        if recipe.activation_power_candidates and validation is None:
            raise SystemExit(f"{args.stats_from} has no validation rows: measure it with --validation-samples")
        stats, timings = earlier["measurements"].stats, {"statistics_from": str(args.stats_from)}
        with MatrixPool() as pool:
            measurements = measure_options(loaded, recipe, cfg, seeds, stats, pool, timings=timings,
                                           validation=validation)
    else:
        calib, calib_info = calibration_tokens(loaded, args.calib_text, args.calib_samples, args.calib_seqlen,
                                               args.seed, prompted=args.calib_from == "prompts",
                                               temperature=args.calib_temperature)
        validation = None
        if recipe.needs_validation and not args.validation_samples:
            args.validation_samples = held_out_rows(args.calib_samples)  # as many as a sage-export run samples
        if args.validation_samples:  # sampled apart (seed + 1), so the calibration rows stay those of a plain measure
            validation = validation_tokens(loaded, args.calib_text, args.validation_samples, args.calib_seqlen,
                                           args.seed, prompted=args.calib_from == "prompts",
                                           temperature=args.calib_temperature)
            calib_info = dict(calib_info, validation_samples=args.validation_samples)
        seeds = layer_seeds(loaded, args.seed)
        with MatrixPool() as pool:
            measurements = measure_v2(loaded, recipe, cfg, seeds, calib, pool, validation=validation)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    torch.save({"measurements": measurements, "seeds": seeds, "calib_info": calib_info, "model": str(args.model),
                "validation": validation,
                "recipe": recipe.to_dict(), "matrix": matrix_fields, "seed": args.seed}, tmp)
    tmp.replace(args.out)
    print(f"saved {args.out}: {measurements.timings}")
    return 0


def load_saved(path: Path) -> dict:
    saved = torch.load(path, weights_only=False)
    # saves older than a field were measured without it: activation_power 1, no candidates, a choice at the budget
    saved["recipe"] = {"activation_power": 1.0, "activation_power_candidates": [], "activation_power_bits": None,
                       **saved["recipe"]}
    return saved


def planned(saved: dict, fields: dict):
    from sage_export.pipeline.sage_v2 import plan_budget

    if any(key in fields and fields[key] != saved["recipe"][key] for key in MEASURE_FIELDS):
        raise SystemExit(f"{', '.join(MEASURE_FIELDS)} change the options: give them to `measure --recipe`")
    recipe = recipe_for(SageRecipe(**saved["recipe"]), fields)
    measurements = reweighted(saved["measurements"], saved["recipe"]["sensitivity_power"], recipe.sensitivity_power)
    measurements = restricted(measurements, recipe.group_options)
    return recipe, measurements, plan_budget(measurements, saved["seeds"], recipe.bits, recipe.floor_gap)


def chosen_shrinks(results: dict) -> dict:
    """Per layer type: how many matrices kept each compensate_candidates shrink (1: uncompensated)."""
    counts = defaultdict(Counter)
    for name, result in results.items():
        if "validation_errors" in result.stats:
            counts[layer_type(name)][f"{result.stats['compensate_shrink']:g}"] += 1
    return {kind: dict(sorted(c.items())) for kind, c in counts.items()}


def cmd_plan(args) -> int:
    saved = load_saved(args.saved)
    for spec in args.variants:
        name, fields = parse_variant(spec)
        _, measurements, plan = planned(saved, fields)
        print(f"{name} {fields}: planned {plan.allocation.true_bits:.3f} true bits")
        for kind, row in allocation_summary(measurements, plan).items():
            print(f"  {kind:10s} {row['true_bits']:.3f}  G {row['G']}")
    return 0


def cmd_finish(args) -> int:
    from sage_export.eval.perplexity import perplexity
    from sage_export.pipeline.sage_v2 import finish_v2
    from sage_export.pipeline.workers import MatrixPool

    saved = load_saved(args.saved)
    name, fields = parse_variant(args.variant)
    recipe, measurements, plan = planned(saved, fields)
    matrix_fields = {**saved.get("matrix", {}), **parse_variant(":" + args.matrix)[1]}
    cfg = replace(V2_MATRIX, **matrix_fields)
    cfg.validate()
    loaded = load_model(args.model)
    texts = [dict(text_entry("wiki" if "wiki" in label else "code", path, loaded.tokenizer), label=label, role=role)
             for role, specs in (("dev", args.dev_text), ("test", args.test_text)) for label, path in specs]
    start = time.perf_counter()
    with MatrixPool() as pool:
        results, summary = finish_v2(loaded, recipe, cfg, saved["seeds"], measurements, pool,
                                     keep_measurements=True)
    finish_s = time.perf_counter() - start
    stamp = {"machine": machine_name(), "date": dt.date.today().isoformat(), "commit": git_commit(),
             "command": "python tools/screen_v2.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    default = SageRecipe().to_dict()  # lists where the recipe holds tuples, as saved
    measured_with = {k: saved["recipe"][k] for k in MEASURE_FIELDS if saved["recipe"][k] != default[k]}
    row = {"variant": name, "fields": {**measured_with, **fields}, "matrix": matrix_fields,
           "model": Path(args.model).name,
           "calibration": saved["calib_info"],
           "true_bits": summary["true_bits"], "budget_bits": recipe.bits, "finish_s": round(finish_s, 1),
           "contract": FUNCTION_VERSION,  # the op layout the bytes were counted in
           "by_type": allocation_summary(measurements, plan), "ctx": args.ctx, "windows": args.windows,
           **({"shrink_chosen": chosen_shrinks(results)} if recipe.compensate_candidates else {}),
           **({"power_choice": measurements.power_choice} if measurements.power_choice else {}),
           "scores": [], **stamp}
    for t in texts:
        n_windows = args.test_windows if t["role"] == "test" and args.test_windows else args.windows
        res = perplexity(loaded.model, t["ids"], args.ctx, n_windows, text=t["label"])
        row["scores"].append({"text": t["label"], "role": t["role"], "sha256": t["sha256"], "ppl": res.ppl,
                              "n_windows": res.n_windows, "window_nll": res.window_nll})
        print(f"{name} on {t['label']} ({t['role']}): ppl {res.ppl:.3f}", flush=True)
    doc = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    doc["rows"] = [r for r in doc["rows"] if (r["variant"], r["model"], r["budget_bits"]) !=
                   (name, row["model"], recipe.bits)] + [row]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=float) + "\n")
    return 0


def render_md(doc: dict) -> str:
    """The screened variants as one table: dev texts first (where choices are made), test texts after."""
    rows = doc["rows"]
    labels = list(dict.fromkeys((sc["role"], sc["text"]) for r in rows for sc in r["scores"]))
    labels.sort(key=lambda rl: rl[0] != "dev")
    out = ["# SAGE v2 recipe variants screened on one model (tools/screen_v2.py)", "",
           "Each variant is finished from the same saved measurement (calibration tokens, statistics, options) and "
           "scored by perplexity over the first windows of each text (non-overlapping, ctx tokens). Choices are made "
           "on the **dev** texts only; test texts are scored in the same run so that a chosen row needs no second "
           "quantization. *true bits*: every stored byte of the quantized Linears × 8 / weights.", "",
           "| model | variant | recipe fields | calibration | true bits | "
           + " | ".join(f"{text} ({role})" for role, text in labels) + " |",
           "|---|---|---|---|---|" + "---|" * len(labels)]
    for r in rows:
        # a text scored on other than the row's window count (finish --test-windows) says how many
        ppl = {(sc["role"], sc["text"]): f"{sc['ppl']:.3f}" + (f" ({sc['n_windows']} windows)"
                                                               if sc["n_windows"] != r["windows"] else "")
               for sc in r["scores"]}
        cal = r["calibration"]
        source = Path(cal["text"]).name if cal.get("source") == "text" else cal.get("source", "?")
        source += "+prompts" if cal.get("start") == "prompts" else ""
        cal_label = f"{source} {cal.get('samples', '?')}×{cal.get('seqlen', '?')}"
        fields = ", ".join(f"{k}={v}" for k, v in {**r.get("matrix", {}), **r["fields"]}.items()) or "(default recipe)"
        if r.get("power_choice"):
            choice = r["power_choice"]
            fields += f" (a = {choice['chosen']:g} chosen at {choice.get('budget_bits', '?')} bits)"
        out.append(f"| {r['model']} | {r['variant']} | {fields} | {cal_label} | {r['true_bits']:.3f} | "
                   + " | ".join(ppl.get(lab, "—") for lab in labels) + " |")
    first = rows[0] if rows else None
    if first:
        out += ["", f"Windows: {first['windows']} × ctx {first['ctx']} per text."]
    out += ["", "Allocation per layer type (true bits, G: matrices):", ""]
    for r in rows:
        kinds = "; ".join(f"{k} {v['true_bits']:.2f} ({', '.join(f'G{g}: {n}' for g, n in v['G'].items())})"
                          for k, v in r["by_type"].items())
        out.append(f"- {r['variant']}: {kinds}")
        if r.get("shrink_chosen"):
            chosen = "; ".join(f"{k} ({', '.join(f'{s}: {n}' for s, n in v.items())})"
                               for k, v in r["shrink_chosen"].items())
            out.append(f"  - shrink kept on validation rows: {chosen}")
    if doc.get("notes"):
        out += ["", "Notes:", ""] + [f"- {note}" for note in doc["notes"]]
    out += ["", "Measured with:", ""]
    out += [f"- `{r['command']}` ({r['machine']}, {r['date']}, commit {r['commit']}, finish {r['finish_s']:.0f} s)"
            for r in rows]
    return "\n".join(out) + "\n"


def cmd_table(args) -> int:
    doc = json.loads(args.json.read_text())
    if args.note:
        doc["notes"] = args.note
        args.json.write_text(json.dumps(doc, indent=1, default=float) + "\n")
    args.json.with_suffix(".md").write_text(render_md(doc))
    print(f"wrote {args.json.with_suffix('.md')}")
    return 0


def text_spec(spec: str) -> tuple[str, Path]:
    label, _, path = spec.partition(":")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"no such text: {path}")
    return label, Path(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--model", required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--calib-text", type=Path)
    m.add_argument("--calib-samples", type=int, help=f"default {CALIB_DEFAULTS['calib_samples']}")
    m.add_argument("--calib-seqlen", type=int, help=f"default {CALIB_DEFAULTS['calib_seqlen']}")
    m.add_argument("--calib-from", choices=["prompts", "bos"], help=f"default {CALIB_DEFAULTS['calib_from']}")
    m.add_argument("--seed", type=int, help=f"default {CALIB_DEFAULTS['seed']}")
    m.add_argument("--calib-temperature", type=float, help="sampling temperature of self-sampled rows (default 1)")
    m.add_argument("--matrix", default="", help="per-matrix SageConfig fields over V2_MATRIX's, key=value,...")
    m.add_argument("--validation-samples", type=int, default=0,
                   help="rows sampled apart (seed + 1) and kept out of the statistics, for compensate_candidates and "
                        "activation_power_candidates (default: an eighth of the calibration where the recipe needs "
                        "them, else none)")
    m.add_argument("--stats-from", type=Path, help="reuse this saved measurement's calibration and statistics")
    m.add_argument("--recipe", default="", help="recipe fields the options depend on (activation_power=1, ...)")
    pl = sub.add_parser("plan")
    pl.add_argument("saved", type=Path)
    pl.add_argument("variants", nargs="+")
    f = sub.add_parser("finish")
    f.add_argument("saved", type=Path)
    f.add_argument("variant")
    f.add_argument("--model", required=True)
    f.add_argument("--dev-text", type=text_spec, action="append", default=[])
    f.add_argument("--test-text", type=text_spec, action="append", default=[])
    f.add_argument("--ctx", type=int, default=2048)
    f.add_argument("--windows", type=int, default=2)
    f.add_argument("--test-windows", type=int, help="windows of each --test-text (default: --windows)")
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--matrix", default="", help="build-time SageConfig fields (row_multipliers=true, ...)")
    t = sub.add_parser("table", help="write the .md beside a finish JSON")
    t.add_argument("json", type=Path)
    t.add_argument("--note", action="append", help="a line for the notes (replaces the notes in the JSON)")
    args = p.parse_args(argv)
    if args.cmd == "measure":
        given = [name for name in ("calib_text", "calib_temperature", *CALIB_DEFAULTS)
                 if getattr(args, name) is not None]
        if args.stats_from and given:
            p.error("--stats-from reuses the saved calibration and seeds; drop "
                    + ", ".join("--" + name.replace("_", "-") for name in given))
        for name, value in {**CALIB_DEFAULTS, "calib_temperature": 1.0}.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    return {"measure": cmd_measure, "plan": cmd_plan, "finish": cmd_finish, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
