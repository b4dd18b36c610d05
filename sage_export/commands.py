"""What each `sage-export` subcommand does. cli.py only parses; this module validates, then runs."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

from .errors import UserError


# ---------------------------------------------------------------- validation (cheap, before any long work)

_V2_SWITCHES = {"no_activation_weighting": ("activation_weighting", False),
                "no_sensitivity": ("layer_sensitivity", False), "graph_groups": ("group_choice", "graph"),
                "no_rho_price": ("price_rho", False), "no_compensation": ("compensate", False),
                "row_multipliers": ("row_multipliers", True)}
_PAPER_ONLY = {"rho_bounds": "--rho-bounds", "fixed_rho": "--fixed-rho", "fixed_groups": "--fixed-groups"}


def _sage_params(args) -> dict:
    params = {"preset": args.preset}
    v2 = args.preset == "v2"
    if not v2:
        given = [flag for flag in ("bits", "activation_power", "activation_power_candidates", "activation_power_bits",
                                   "compensate_candidates", *_V2_SWITCHES)
                 if getattr(args, flag, None) not in (None, False)]
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} needs the v2 preset (the paper preset is data-free "
                            "and has no bit budget)")
    else:
        given = [flag for attr, flag in _PAPER_ONLY.items() if getattr(args, attr) is not None]
        if given:
            raise UserError(f"{given[0]} is a paper-preset option (v2 chooses G and ρ per matrix under --bits); "
                            "add --preset paper")
        if args.activation_power is not None and getattr(args, "activation_power_candidates", None) is not None:
            raise UserError("give --activation-power (one power) or --activation-power-candidates (a choice), "
                            "not both")
        if args.activation_power is not None and getattr(args, "activation_power_bits", None) is not None:
            raise UserError("--activation-power-bits is where candidate powers are compared; one --activation-power "
                            "compares nothing")
        if args.bits is not None:
            params["bits"] = args.bits
        if getattr(args, "activation_power_bits", None) is not None:
            params["activation_power_bits"] = args.activation_power_bits
        if args.activation_power is not None:
            params["activation_power"] = args.activation_power
        if getattr(args, "activation_power_candidates", None) is not None:
            params["activation_power_candidates"] = tuple(args.activation_power_candidates)
        if getattr(args, "compensate_candidates", None) is not None:
            params["compensate_candidates"] = tuple(args.compensate_candidates)
        params.update(dict(field for flag, field in _V2_SWITCHES.items() if getattr(args, flag)))
    params.update({
        "salient_bits": args.salient_bits,
        "rho_bounds": tuple(args.rho_bounds) if args.rho_bounds else None,
        "fixed_rho": args.fixed_rho,
        "fixed_groups": args.fixed_groups,
        "group_candidates": tuple(range(args.group_candidates[0], args.group_candidates[1] + 1))
        if args.group_candidates else None,
        "graph_samples": args.graph_samples,
    })
    return {k: v for k, v in params.items() if v is not None}


def method_from_args(args):
    from .pipeline.methods import Method

    if args.method != "sage" and (args.bits is not None or args.preset != "v2"):
        flag = "--bits" if args.bits is not None else "--preset"
        raise UserError(f"{flag} is a SAGE option; rtn/gptq take --code-bits and --group-size")
    if args.method in ("rtn", "gptq"):
        method = Method(args.method, {"bits": args.code_bits, "group_size": args.group_size})
    elif args.method == "sage":
        method = Method("sage", _sage_params(args))
    else:
        method = Method(args.method)
    try:
        method.validate()
    except (ValueError, TypeError) as exc:
        raise UserError(f"invalid quantizer options: {exc}") from None
    return method


def _existing_file(path: Path | None, what: str) -> Path | None:
    if path is not None and not Path(path).is_file():
        raise UserError(f"{what} not found: {path}")
    return path


def check_texts(args, needs_calibration: bool) -> tuple[Path | None, Path | None]:
    """The evaluation and calibration texts, checked up front. No --calib-text means the model writes its own
    calibration text (when the method needs one)."""
    eval_text = _existing_file(args.eval_text, "eval text")
    calib = _existing_file(getattr(args, "calib_text", None), "calibration text")
    if eval_text and calib and eval_text.resolve() == calib.resolve():
        raise UserError("calibration text must not be the evaluation text")
    if args.ctx < 16:
        raise UserError(f"--ctx must be at least 16, got {args.ctx}")
    if needs_calibration and (args.calib_samples < 1 or args.calib_seqlen < 2):
        raise UserError(f"--calib-samples must be >= 1 and --calib-seqlen >= 2, got {args.calib_samples}, "
                        f"{args.calib_seqlen}")
    if getattr(args, "jobs", None) is not None and args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    return eval_text, calib


# ---------------------------------------------------------------- model / quantize

def cmd_model(args) -> int:
    from .format.atomic import atomic_output_dir
    from .models import resolve_source

    method = method_from_args(args)
    if args.stream == "yes" and not method.streams:
        raise UserError(f"--stream yes: {method.name} cannot stream (its sequential driver writes dense weights "
                        "back into the model); use --stream auto or no")
    eval_text, calib_text = check_texts(args, method.needs_calibration)
    do_onnx = args.command == "model" and not args.no_onnx
    if do_onnx and method.name != "sage":
        print(f"note: {method.label} is a baseline without an ONNX op; skipping ONNX export")
        do_onnx = False
    if getattr(args, "trt", False):
        if method.name != "sage" or args.no_onnx:
            raise UserError("--trt needs --method sage and the ONNX export")
        args.engine_plan = plan_engine(args)
    elif getattr(args, "target", None) or getattr(args, "hardware_compat", None):
        raise UserError("--target and --hardware-compat need --trt")
    source = resolve_source(args.model)
    with atomic_output_dir(args.out, args.force) as tmp:
        report = run_pipeline(args, source, method, eval_text, calib_text, Path(tmp), do_onnx)
    print_summary(args.out, report)
    return check_verdict(report.get("onnx", {}).get("checks"), args.out)


EXIT_CHECK_FAILED = 1


def check_verdict(checks: dict | None, out: Path) -> int:
    """Exit status after the ONNX Runtime check: the artifacts stay (they are complete, and what a user needs to
    see why), but a check that missed its thresholds fails the command in one line."""
    if not checks or not checks["failures"]:
        return 0
    print(f"sage-export: error: the ONNX Runtime check failed: {'; '.join(checks['failures'])} "
          f"(artifacts kept in {out} for inspection)", file=sys.stderr)
    return EXIT_CHECK_FAILED


def run_pipeline(args, source, method, eval_text, calib_text, out: Path, do_onnx: bool) -> dict:
    from .report.build import write_report
    from .stages import StageMeter

    with StageMeter() as meter:
        rep = _run_stages(meter, args, source, method, eval_text, calib_text, out, do_onnx)
    rep["timings"], rep["peak_rss_mb"] = meter.timings, meter.peak_mb
    rep["files"] = file_sizes(out)
    write_report(out, rep)
    return rep


def _run_stages(timer, args, source, method, eval_text, calib_text, out: Path, do_onnx: bool) -> dict:
    from .models import choose_streaming, load_model
    from .pipeline.artifact import deterministic_info, round_float_params, write_checkpoint
    from .pipeline.calibration import calibration_tokens, validation_tokens
    from .pipeline.guard import held_out_rows, score_after, score_before, warning_line
    from .pipeline.quantize import quantize_model
    from .report.build import bits_summary, layer_rows

    stream = method.streams and choose_streaming(source, args.stream)
    if stream and args.stream == "auto":
        print("note: streaming the model (its float32 weights exceed 1/8 of this machine's memory; --stream no "
              "to load it whole)")
    with timer.step("load"):
        loaded = load_model(source, stream=stream)
    if method.preset == "v2":
        from .pipeline.sage_v2 import check_budget

        try:
            note = check_budget(loaded, method.sage_recipe(), method.sage_config())
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if note:
            print(note, file=sys.stderr)
    calib, calib_info, guard, validation = None, None, None, None
    if method.needs_calibration:
        recipe = method.sage_recipe()
        held_rows = held_out_rows(args.calib_samples) if recipe else 0
        with timer.step("calibration_text"):
            calib, calib_info = calibration_tokens(loaded, calib_text, args.calib_samples + held_rows,
                                                   args.calib_seqlen, args.seed,
                                                   prompted=args.calib_from == "prompts")
            if recipe and recipe.needs_validation:
                validation = validation_tokens(loaded, calib_text, held_rows, args.calib_seqlen, args.seed,
                                               prompted=args.calib_from == "prompts")  # as many as the guard's
        if held_rows:
            calib, held = calib[:args.calib_samples], calib[args.calib_samples:]
            calib_info = dict(calib_info, samples=args.calib_samples, tokens=int(calib.numel()),
                              held_out_samples=held_rows)
            if validation is not None:
                calib_info["validation_samples"] = validation.shape[0]
            with timer.step("guard_fp_rtn"):
                guard = score_before(loaded, held, recipe.bits)
    with timer.step("quantize"):
        qmodel = quantize_model(loaded, method, args.seed, calib, calib_info, jobs=args.jobs, validation=validation)
    if guard is not None:
        with timer.step("guard_result"):
            guard = score_after(loaded.model, held, guard, qmodel.budget["true_bits"])
        line = warning_line(guard)
        if line:
            print(line, file=sys.stderr)
    round_float_params(loaded.model, list(qmodel.layers), args.float_dtype)
    meta = {"model": source.description, "model_type": source.model_type, "method": method.to_dict(),
            "seed": args.seed, "calibration": deterministic_info(calib_info), "budget": deterministic_info(qmodel.budget),
            "sage_export_version": _version()}
    with timer.step("write_checkpoint"):
        write_checkpoint(out / "checkpoint", loaded, qmodel, meta, args.float_dtype)
    rep = {"model": {"description": source.description, "model_type": source.model_type, "kind": source.kind,
                     "streamed": loaded.streamed},
           "method": method.to_dict(), "seed": args.seed, "calibration": calib_info, "budget": qmodel.budget,
           "float_dtype": args.float_dtype, "layers": layer_rows(qmodel.layers), "guard": guard}
    rep["bits"] = bits_summary(rep["layers"])
    with timer.step("samples"):
        from .eval.samples import PROMPTS, greedy_continuations

        # A streamed model decodes every packed layer on every call (bounded memory, about 10 ns per weight on 2
        # cores): one prompt and 16 tokens instead of three prompts and 24.
        short = {"prompts": PROMPTS[:1], "n_new": 16} if loaded.streamed else {}
        rep["samples"] = greedy_continuations(loaded.model, loaded.tokenizer, **short)
    if eval_text:
        with timer.step("perplexity"):
            rep["perplexity"] = evaluate(loaded.model, loaded.tokenizer, eval_text, args.ctx, args.eval_windows)
    if do_onnx:
        rep["onnx"] = export_and_check(loaded, qmodel, out / "onnx", eval_text, args, timer)
    if getattr(args, "trt", False):
        with timer.step("tensorrt"):
            rep["trt"] = build_trt(out, args.engine_plan)
    return rep


def evaluate(model, tokenizer, text_path: Path, ctx: int, n_windows: int | None) -> dict:
    from .eval.perplexity import perplexity, read_eval_text, tokenize_text

    ids = tokenize_text(tokenizer, read_eval_text(text_path))
    return perplexity(model, ids, ctx, n_windows, text=text_path.name).to_dict()


def export_and_check(loaded, qmodel, onnx_dir: Path, eval_text: Path | None, args, timer) -> dict:
    from .onnx.export import export_quantized_onnx
    from .onnx.ort_check import run_checks

    with timer.step("onnx_export"):
        onnx_dir.mkdir(parents=True, exist_ok=True)
        result = export_quantized_onnx(loaded.model, loaded.architecture,
                                       {name: r.packed() for name, r in qmodel.layers.items()}, onnx_dir)

    def release_torch():
        # The last use of the PyTorch model and the quantized layers (the report's rows are taken already): the
        # ORT session then holds the only copy of the packed weights.
        loaded.model = None
        qmodel.layers = {}
        gc.collect()

    with timer.step("ort_check"):
        checks = run_checks(result, loaded.model, loaded.tokenizer, eval_text=eval_text, ctx=min(args.ctx, 512),
                            release_torch=release_torch)
    return {"export": result.to_dict(), "checks": checks}


def plan_engine(args) -> dict:
    """What an engine build needs, checked before any work: TensorRT first (one line where it is missing), then
    the target, its hardware compatibility level, a timing cache to start from, and a plugin build that suits the
    target (found or built now, not after the quantization)."""
    from .trt.engine import require_tensorrt
    from .trt.plugin import plugin_for_target
    from .trt.targets import get_target

    require_tensorrt()
    target = get_target(getattr(args, "target", None) or "native")
    hardware = target.hardware_level(getattr(args, "hardware_compat", None))
    seed = _existing_file(getattr(args, "timing_cache", None), "timing cache")
    return {"target": target, "hardware": hardware, "timing_cache_seed": seed, "plugin": plugin_for_target(target)}


def build_trt(out: Path, plan: dict) -> dict:
    from .trt.engine import EngineRequest, build_and_compare

    return build_and_compare(EngineRequest(out / "onnx" / "model.onnx", out / "engine", **plan))


def file_sizes(out: Path) -> dict:
    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}


def print_summary(out: Path, rep: dict) -> None:
    b = rep["bits"]
    print(f"wrote {out}: {b['n_layers']} layers at {b['true_bits']:.3f} true bits/weight "
          f"(paper {b['paper_weight_bits']:.3f} + {b['paper_scale_bits']:.3f} scale), "
          f"{b['packed_bytes'] / 1e6:.2f} MB packed vs {b['fp16_bytes'] / 1e6:.2f} MB fp16")
    if "perplexity" in rep:
        p = rep["perplexity"]
        print(f"perplexity {p['ppl']:.3f} on {p['text']} (ctx {p['ctx']}, {p['n_windows']} windows)")
    if rep.get("samples"):
        first = rep["samples"][0]
        text = " ".join(first["continuation"].split())[:80]
        print(f"greedy: {first['prompt']} → {text}")
    print(f"report: {out / 'report.md'}")


def _version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------- export / eval / inspect

def cmd_export(args) -> int:
    from .format.atomic import atomic_output_dir
    from .onnx.export import export_quantized_onnx
    from .onnx.ort_check import run_checks
    from .pipeline.artifact import load_quantized

    if not (Path(args.checkpoint) / "manifest.json").is_file():
        raise UserError(f"not a packed checkpoint (no manifest.json): {args.checkpoint}")
    held = dict(zip(("model", "tokenizer", "checkpoint"), load_quantized(args.checkpoint)))
    from .models import architecture_for

    arch = architecture_for(held["model"].config.model_type)

    def release_torch():  # as in export_and_check: the session's copy of the packed weights is then the only one
        held.clear()
        gc.collect()

    tokenizer = held["tokenizer"]
    with atomic_output_dir(args.out, args.force) as tmp:
        result = export_quantized_onnx(held["model"], arch, held["checkpoint"].packed_linears(), Path(tmp))
        checks = run_checks(result, held["model"], tokenizer, eval_text=None, ctx=512, release_torch=release_torch)
        (Path(tmp) / "check_report.json").write_text(
            json.dumps({"export": result.to_dict(), "checks": checks}, indent=1, sort_keys=True, default=float))
    print(f"wrote {args.out}")
    return check_verdict(checks, args.out)


def cmd_rewrite(args) -> int:
    """An ONNX from another exporter -> the same graph with SageBinaryGemm nodes (onnx/rewrite.py), checked in
    ONNX Runtime against the checkpoint's PyTorch model."""
    from .format.atomic import atomic_output_dir
    from .format.checkpoint import load_checkpoint
    from .onnx.rewrite import (check_feedable, check_rewritten, load_structure, plan_rewrite, read_name_map,
                               write_rewrite)
    from .pipeline.artifact import load_quantized

    _existing_file(args.onnx, "ONNX model")
    if not (Path(args.checkpoint) / "manifest.json").is_file():
        raise UserError(f"not a packed checkpoint (no manifest.json): {args.checkpoint}")
    name_map = read_name_map(args.name_map)
    source = load_structure(args.onnx)
    logits_name = check_feedable(source)
    if Path(args.out).exists() and not args.force:
        raise FileExistsError(f"{Path(args.out).absolute()} already exists; pass --force to overwrite it")
    ckpt = load_checkpoint(args.checkpoint)
    others = sorted(n for n, r in ckpt.layers.items() if r.method != "sage")
    if others:
        raise UserError(f"only SAGE layers become SageBinaryGemm nodes; {others[0]} is {ckpt.layers[others[0]].method}")
    if not ckpt.layers:
        raise UserError(f"the checkpoint {args.checkpoint} holds no quantized layer")
    packed = ckpt.packed_linears()
    del ckpt
    plan = plan_rewrite(args.onnx, packed, name_map, source)
    for m in plan.matches:
        print(f"{m.layer} -> {m.site.label}: by {m.how}, cosine {m.cosine:.3f}")
    with atomic_output_dir(args.out, args.force) as tmp:
        result = write_rewrite(plan, packed, Path(tmp))
        del plan, packed, source  # the check loads the checkpoint's model; the rewrite's copies are not needed any more
        gc.collect()
        model, tokenizer, _ = load_quantized(args.checkpoint)
        checks = check_rewritten(result, logits_name, model, tokenizer)
        (Path(tmp) / "check_report.json").write_text(
            json.dumps({"rewrite": result.to_dict(), "checks": checks}, indent=1, sort_keys=True, default=float))
    print(f"wrote {args.out}: {result.n_sage_nodes} SageBinaryGemm nodes")
    return check_verdict(checks, args.out)


def cmd_engine(args) -> int:
    """A TensorRT engine of an exported ONNX (model, export or rewrite output) for a deployment target."""
    from .format.atomic import atomic_output_dir
    from .onnx.generate import find_onnx
    from .trt.engine import EngineRequest, build_and_compare

    plan = plan_engine(args)
    onnx_path = find_onnx(args.onnx).absolute()
    with atomic_output_dir(args.out, args.force) as tmp:
        info = build_and_compare(EngineRequest(onnx_path, Path(tmp), **plan))
    print(f"wrote {args.out}: engine for {info['target']['name']} ({info['target']['device']}), "
          f"{info['plugin_layers']} plugin layers, profiles {', '.join(info['profile_order'])}")
    return 0


def cmd_eval(args) -> int:
    _existing_file(args.eval_text, "eval text")
    if args.eval_text is None:
        raise UserError("eval needs --eval-text FILE")
    from .onnx.generate import evaluate_onnx, onnx_artifact

    onnx_path = onnx_artifact(args.artifact)
    if onnx_path is not None:  # an exported model: ONNX Runtime computes the logits
        print(json.dumps(evaluate_onnx(onnx_path, args.eval_text, args.ctx, args.eval_windows), indent=1))
        return 0
    path = Path(args.artifact) if args.artifact else None
    if path is not None and (path / "checkpoint" / "manifest.json").is_file():
        path = path / "checkpoint"
    if path is not None and (path / "manifest.json").is_file():
        from .pipeline.artifact import load_quantized

        model, tokenizer, _ = load_quantized(path)
    else:
        from .models import load_model

        loaded = load_model(args.artifact)
        model, tokenizer = loaded.model, loaded.tokenizer
    res = evaluate(model, tokenizer, args.eval_text, args.ctx, args.eval_windows)
    print(json.dumps(res, indent=1))
    return 0


def cmd_inspect(args) -> int:
    from .format.checkpoint import load_checkpoint

    path = Path(args.artifact)
    if (path / "report.json").is_file():
        rep = json.loads((path / "report.json").read_text())
        print((path / "report.md").read_text() if (path / "report.md").is_file() else json.dumps(rep["bits"]))
        return 0
    if (path / "checkpoint").is_dir():
        path = path / "checkpoint"
    if not (path / "manifest.json").is_file():
        raise UserError(f"not a sage-export artifact (no report.json or manifest.json): {args.artifact}")
    ckpt = load_checkpoint(path)
    print(json.dumps({"meta": {k: v for k, v in ckpt.meta.items() if k != "layer_stats"},
                      "layers": len(ckpt.layers), "checksums": "verified"}, indent=1, sort_keys=True))
    return 0


def cmd_generate(args) -> int:
    from .onnx.generate import GenerationTiming, find_onnx, find_tokenizer_dir, stream_text, stream_tokens

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not (args.temperature >= 0):
        raise UserError(f"--temperature must be 0 or more, got {args.temperature}")
    onnx_path = find_onnx(args.artifact)
    tok_dir = args.tokenizer or find_tokenizer_dir(args.artifact, onnx_path)
    from transformers import AutoTokenizer

    from .onnx.ort_check import make_session

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    prompt = tokenizer(args.prompt, add_special_tokens=False).input_ids
    if not prompt:
        raise UserError("--prompt is empty after tokenization")
    timing = GenerationTiming()
    session = make_session(onnx_path, constant_folding=args.fold_constants)
    timing.session_made()
    print(args.prompt, end="", flush=True)
    tokens = stream_tokens(session, prompt, args.max_new_tokens, tokenizer.eos_token_id, args.temperature, args.seed)
    for piece in stream_text(tokenizer, timing.wrap(tokens)):
        print(piece, end="", flush=True)
    print()
    print(timing.summary(session.sage_runtime), file=sys.stderr)
    return 0


def run(args) -> int:
    handlers = {"model": cmd_model, "quantize": cmd_model, "export": cmd_export, "eval": cmd_eval,
                "inspect": cmd_inspect, "generate": cmd_generate, "rewrite": cmd_rewrite, "engine": cmd_engine}
    return handlers[args.command](args)
