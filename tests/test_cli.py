"""The `sage-export` command as users run it: artifacts on success, one line and nothing written on failure."""

import importlib.util
import json
import subprocess
import sys

import pytest

from sage_export.cli import main
from sage_export.format.checkpoint import load_checkpoint

FAST = ["--calib-samples", "8", "--calib-seqlen", "32"]  # the default v2 preset, on less self-sampled text


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sage_export.cli", *map(str, args)], capture_output=True, text=True)


def message_lines(stderr: str) -> list[str]:
    """stderr without progress bars (an error found after loading the model follows the loading bar)."""
    return [l for l in stderr.replace("\r", "\n").splitlines() if l.strip() and "%|" not in l]


def assert_one_line_error(proc, pattern: str):
    assert proc.returncode == 2, proc.stderr
    lines = message_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("sage-export: error:"), proc.stderr
    assert pattern in lines[0]


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir())


@pytest.fixture(scope="module")
def tiny_run(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    text = tmp_path_factory.mktemp("text") / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 60)
    assert main(["model", str(tiny_llama_dir), "--out", str(out), "--eval-text", str(text), "--ctx", "64",
                 "--seed", "3", *FAST]) == 0
    return out


def test_model_command_writes_every_artifact(tiny_run):
    ckpt = load_checkpoint(tiny_run / "checkpoint")  # verifies every sha256
    assert len(ckpt.layers) == 14 and all(r.method == "sage" for r in ckpt.layers.values())
    rep = json.loads((tiny_run / "report.json").read_text())
    assert rep["method"]["name"] == "sage" and len(rep["layers"]) == 14
    assert rep["budget"]["preset"] == "v2" and rep["budget"]["budget_bits"] == 3.2
    assert rep["calibration"]["source"] == "self-generated" and rep["calibration"]["tokens"] == 8 * 32
    bits = rep["bits"]
    assert abs(bits["true_bits"] - 3.2) <= 0.05  # 14 small matrices: coarse steps (the ±0.02 test has more text)
    assert bits["true_bits"] == pytest.approx(8 * bits["packed_bytes"] / bits["n_weights"])
    # CSR column indices and group codes are stored but not in the paper count, so true bits are higher.
    assert bits["true_bits"] > bits["paper_weight_bits"] + bits["paper_scale_bits"]
    assert bits["packed_bytes"] < bits["fp16_bytes"]
    assert rep["perplexity"]["ppl"] > 1 and rep["perplexity"]["ctx"] == 64
    md = (tiny_run / "report.md").read_text()
    assert "true storage" in md and "![" in md
    assert "budget 3.20 true bits" in md and "text the model sampled itself" in md
    assert "Does it still talk?" in md and "*The capital of France is* →" in md
    assert [s["prompt"] for s in rep["samples"]][0] == "The capital of France is"
    guard = rep["guard"]  # every v2 report carries the guard's three figures
    assert guard["held_out"]["rows"] == 2 and guard["fp_ppl"] > 1 and guard["sage_ppl"] > 1
    assert guard["rtn"]["ppl"] > 1 and guard["rtn"]["true_bits"] <= rep["bits"]["true_bits"]
    assert "## Guard" in md and f"{guard['sage_ppl']:.3f}" in md
    for png in ("bits_per_layer.png", "groups_rho_per_layer.png", "error_per_layer.png"):
        data = (tiny_run / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_onnx_artifact_runs_in_onnxruntime(tiny_run):
    import onnxruntime as ort

    rep = json.loads((tiny_run / "report.json").read_text())
    sess = ort.InferenceSession(str(tiny_run / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert "logits" in [o.name for o in sess.get_outputs()]
    assert rep["onnx"]["checks"]


def test_same_seed_gives_byte_identical_checkpoint(tiny_llama_dir, tiny_run, tmp_path):
    out = tmp_path / "again"
    assert main(["quantize", str(tiny_llama_dir), "--out", str(out), "--seed", "3", *FAST]) == 0
    for name in ("packed.safetensors", "float.safetensors", "manifest.json"):
        assert (out / "checkpoint" / name).read_bytes() == (tiny_run / "checkpoint" / name).read_bytes(), name


def test_another_seed_gives_other_bytes(tiny_llama_dir, tiny_run, tmp_path):
    out = tmp_path / "seed4"
    assert main(["quantize", str(tiny_llama_dir), "--out", str(out), "--seed", "4", *FAST]) == 0
    assert (out / "checkpoint" / "packed.safetensors").read_bytes() != \
        (tiny_run / "checkpoint" / "packed.safetensors").read_bytes()


def test_compensate_candidates_sample_validation_rows_apart_from_the_guard(tiny_llama_dir, tiny_run, tmp_path):
    """--compensate-candidates: extra rows (seed + 1) judge each matrix's compensation, so the calibration and
    guard rows are the default run's own; the paper preset refuses the option in one line."""
    out = tmp_path / "validated"
    assert main(["quantize", str(tiny_llama_dir), "--out", str(out), "--seed", "3", "--compensate-candidates", "0",
                 "0.5", "1", *FAST]) == 0
    rep = json.loads((out / "report.json").read_text())
    plain = json.loads((tiny_run / "report.json").read_text())
    assert rep["calibration"]["validation_samples"] == plain["calibration"]["validation_samples"] == 2
    assert rep["calibration"]["tokens"] == plain["calibration"]["tokens"]
    assert rep["guard"]["fp_ppl"] == plain["guard"]["fp_ppl"]  # the same held-out rows, scored the same
    assert rep["method"]["params"]["compensate_candidates"] == [0.0, 0.5, 1.0]
    judged = [layer for layer in rep["layers"] if "validation_errors" in layer]  # what each matrix kept, and why
    assert judged and all(layer["compensate_shrink"] in (0.0, 0.5, 1.0) for layer in judged)
    assert_one_line_error(run_cli("quantize", tiny_llama_dir, "--out", tmp_path / "p", "--preset", "paper",
                                  "--compensate-candidates", "0", "1"), "--compensate-candidates needs the v2")


def test_the_default_chooses_the_activation_power_on_validation_rows_and_says_so(tiny_llama_dir, tiny_run,
                                                                                  tmp_path):
    """The default run tries each power of activation_power_candidates and keeps the best on its validation rows:
    the choice and each candidate's score reach report.json and report.md, the guard still scores its own rows. One
    --activation-power means that power alone (no validation rows); other candidates can be given."""
    rep = json.loads((tiny_run / "report.json").read_text())
    choice = rep["budget"]["activation_power_choice"]
    assert [c["activation_power"] for c in choice["candidates"]] == [0.5, 0.25]
    assert choice["chosen"] == min(choice["candidates"], key=lambda c: c["validation_ppl"])["activation_power"]
    assert rep["budget"]["recipe"]["activation_power_candidates"] == [0.5, 0.25]
    assert rep["budget"]["recipe"]["activation_power"] == choice["chosen"]  # the recipe as it ran
    assert rep["calibration"]["validation_samples"] == 2 and rep["guard"]["held_out"]["rows"] == 2
    assert f"Activation power **{choice['chosen']:g}**" in (tiny_run / "report.md").read_text()
    out = tmp_path / "one"
    assert main(["quantize", str(tiny_llama_dir), "--out", str(out), "--seed", "3", "--activation-power", "0.5",
                 *FAST]) == 0
    one = json.loads((out / "report.json").read_text())
    assert "activation_power_choice" not in one["budget"] and "validation_samples" not in one["calibration"]
    assert one["guard"]["fp_ppl"] == rep["guard"]["fp_ppl"]  # the same held-out rows
    if choice["chosen"] == 0.5:  # then the default run is exactly this one-power run
        assert (out / "checkpoint" / "packed.safetensors").read_bytes() == \
            (tiny_run / "checkpoint" / "packed.safetensors").read_bytes()
    out = tmp_path / "three"
    assert main(["quantize", str(tiny_llama_dir), "--out", str(out), "--seed", "3", "--activation-power-candidates",
                 "1", "0.5", "0.25", *FAST]) == 0
    three = json.loads((out / "report.json").read_text())["budget"]["activation_power_choice"]
    assert [c["activation_power"] for c in three["candidates"]] == [1.0, 0.5, 0.25]
    assert_one_line_error(run_cli("quantize", tiny_llama_dir, "--out", tmp_path / "p", "--preset", "paper",
                                  "--activation-power-candidates", "0.5"), "--activation-power-candidates needs the v2")
    assert_one_line_error(run_cli("quantize", tiny_llama_dir, "--out", tmp_path / "b", "--activation-power", "0.5",
                                  "--activation-power-candidates", "0.5", "0.25"), "not both")
    assert not (tmp_path / "b").exists()


def test_activation_power_bits_sets_where_the_candidates_are_compared(tiny_llama_dir, tmp_path):
    """--activation-power-bits B compares the candidate powers' allocations at B instead of 3.2 (report and recipe
    say so); it needs the v2 preset, candidates to compare, and a number in (0, 32], each refused in one line."""
    out = tmp_path / "at4"
    assert main(["quantize", str(tiny_llama_dir), "--out", str(out), "--seed", "3", "--activation-power-bits", "4",
                 *FAST]) == 0
    budget = json.loads((out / "report.json").read_text())["budget"]
    assert budget["activation_power_choice"]["budget_bits"] == 4.0
    assert budget["recipe"]["activation_power_bits"] == 4.0
    for extra, pattern in ((["--preset", "paper"], "--activation-power-bits needs the v2"),
                           (["--activation-power", "0.5"], "one --activation-power compares nothing"),
                           ([], "activation_power_bits must be a number in (0, 32]")):
        bits = "-1" if not extra else "4"
        assert_one_line_error(run_cli("quantize", tiny_llama_dir, "--out", tmp_path / "bad",
                                      "--activation-power-bits", bits, *extra), pattern)
        assert not (tmp_path / "bad").exists()


def test_a_wrong_onnx_result_fails_the_command(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """The exported file is corrupted after export (every sign bit of one layer flipped): ONNX Runtime then
    computes another function than PyTorch, and the command must say so and exit non-zero."""
    import onnx

    import sage_export.onnx.export as export

    real = export.export_quantized_onnx

    def corrupted(*args, **kwargs):
        result = real(*args, **kwargs)
        proto = onnx.load(str(result.onnx_path), load_external_data=False)
        tensor = next(t for t in proto.graph.initializer if t.name.endswith("layers.0.mlp.gate_proj.sign_bits"))
        where = {e.key: e.value for e in tensor.external_data}
        path = result.onnx_path.parent / where["location"]
        data = bytearray(path.read_bytes())
        start, length = int(where["offset"]), int(where["length"])
        data[start:start + length] = bytes(b ^ 0xFF for b in data[start:start + length])
        path.write_bytes(bytes(data))
        return result

    monkeypatch.setattr(export, "export_quantized_onnx", corrupted)
    code = main(["model", str(tiny_llama_dir), "--out", str(tmp_path / "o"), "--preset", "paper", "--fixed-groups",
                 "2", "--graph-samples", "500"])
    err = message_lines(capsys.readouterr().err)
    assert code == 1 and len(err) == 1 and "ONNX Runtime check failed" in err[0] and "logits" in err[0], err
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["onnx"]["checks"]["failures"]


def test_ort_check_thresholds_hold_on_the_default_run(tiny_run):
    checks = json.loads((tiny_run / "report.json").read_text())["onnx"]["checks"]
    assert checks["failures"] == [] and checks["greedy"]["identical"]
    assert checks["logits"]["rel_l2"] <= checks["thresholds"]["logits_rel_l2"]
    assert checks["perplexity"]["rel_diff"] <= checks["thresholds"]["perplexity_rel_diff"]
    # The native op when it is built (tools/install.sh), else the function body, unfolded.
    assert checks["session"].endswith("constant folding off") or checks["sage_runtime"] == "custom_op"


def test_generate_streams_what_the_ort_check_generated(tiny_run, capsys):
    from transformers import AutoTokenizer

    from sage_export.onnx.generate import stream_tokens
    from sage_export.onnx.ort_check import greedy_generate_ort, make_session

    session = make_session(tiny_run / "onnx" / "model.onnx", constant_folding=False)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_run / "checkpoint"))
    prompt = tokenizer("The capital of France is", add_special_tokens=False).input_ids
    assert list(stream_tokens(session, prompt, 10)) == greedy_generate_ort(session, prompt, 10)
    sampled = [list(stream_tokens(session, prompt, 10, temperature=1.0, seed=s)) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]

    assert main(["generate", str(tiny_run), "--prompt", "The capital of France is", "--max-new-tokens", "10"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The capital of France is") and len(out.strip()) > len("The capital of France is")


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--temperature", "-1"], "--temperature"),
], ids=["no-tokens", "negative-temperature"])
def test_generate_bad_input(tiny_run, flags, message):
    assert_one_line_error(run_cli("generate", tiny_run, "--prompt", "x", *flags), message)


def test_generate_without_an_export(tmp_path):
    assert_one_line_error(run_cli("generate", tmp_path, "--prompt", "x"), "no exported model")


def _corrupt_copy(tiny_run, tmp_path, how: str):
    """A copy of the run's checkpoint damaged one way; for "csr" the damage is re-signed (checksums updated), so
    only the layout's own validation can catch it."""
    import hashlib
    import shutil

    from safetensors.numpy import load_file, save_file

    from sage_export.format.checkpoint import _tensor_bytes

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_run / "checkpoint", ckpt)
    packed, manifest = ckpt / "packed.safetensors", ckpt / "manifest.json"
    if how == "truncated":
        packed.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    elif how == "manifest":
        manifest.write_text(manifest.read_text()[:200])
    elif how == "csr":
        tensors = load_file(packed)
        layer = next(n for n in json.loads(manifest.read_text())["layers"]
                     if tensors[f"{n}.salient_cols"].size)
        cols = tensors[f"{layer}.salient_cols"].copy()
        cols[-1] = -1  # both bytes 0xFF: column 65535, far past K
        tensors[f"{layer}.salient_cols"] = cols
        save_file(tensors, packed)
        doc = json.loads(manifest.read_text())
        doc["layers"][layer]["tensors"]["salient_cols"]["sha256"] = hashlib.sha256(_tensor_bytes(cols)).hexdigest()
        blob = packed.read_bytes()
        doc["files"]["packed.safetensors"] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
        manifest.write_text(json.dumps(doc))
    return ckpt


@pytest.mark.parametrize("how, message", [("truncated", "expected"), ("manifest", "not valid JSON"),
                                          ("csr", "salient_cols")])
def test_export_of_a_damaged_checkpoint(tiny_run, tmp_path, how, message):
    ckpt = _corrupt_copy(tiny_run, tmp_path, how)
    proc = run_cli("export", ckpt, "--out", tmp_path / "onnx")
    assert_one_line_error(proc, message)
    assert leftovers(tmp_path) == ["ckpt"]


def test_corrupt_gguf(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(40))
    proc = run_cli("model", tmp_path / "bad.gguf", "--out", tmp_path / "o")
    assert_one_line_error(proc, "not a readable GGUF file")
    assert leftovers(tmp_path) == ["bad.gguf"]


def test_onnx_export_is_byte_identical_across_processes(tiny_run, tmp_path):
    for name in ("a", "b"):
        proc = run_cli("export", tiny_run / "checkpoint", "--out", tmp_path / name)
        assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
        assert (tmp_path / "a" / name).read_bytes() == (tiny_run / "onnx" / name).read_bytes(), name


def test_missing_model(tmp_path):
    proc = run_cli("model", tmp_path / "nope", "--out", tmp_path / "o")
    assert_one_line_error(proc, "model not found")
    assert leftovers(tmp_path) == []


def test_unsupported_architecture(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "gpt2"}')
    proc = run_cli("model", tmp_path / "m", "--out", tmp_path / "o")
    assert_one_line_error(proc, "unsupported architecture 'gpt2'")
    assert leftovers(tmp_path) == ["m"]


def test_existing_output_needs_force(tiny_llama_dir, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    proc = run_cli("model", tiny_llama_dir, "--out", tmp_path / "o")
    assert_one_line_error(proc, "--force")
    assert leftovers(tmp_path / "o") == ["keep.txt"]


def test_unwritable_output_location(tiny_llama_dir, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    proc = run_cli("model", tiny_llama_dir, "--out", tmp_path / "file" / "o")
    assert proc.returncode == 2 and "sage-export: error:" in proc.stderr
    assert leftovers(tmp_path) == ["file"]


def test_bad_quantizer_option(tiny_llama_dir, tmp_path):
    proc = run_cli("model", tiny_llama_dir, "--out", tmp_path / "o", "--preset", "paper", "--rho-bounds", "0.5", "0.1")
    assert_one_line_error(proc, "invalid quantizer options")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("flags, message", [
    (["--fixed-groups", "2"], "add --preset paper"),
    (["--preset", "paper", "--bits", "3"], "needs the v2 preset"),
    (["--preset", "paper", "--no-compensation"], "needs the v2 preset"),
    (["--method", "rtn", "--bits", "3"], "--code-bits"),
    (["--bits", "0"], "invalid quantizer options"),
    (["--bits", "0.6"], "below the smallest"),
    (["--graph-groups", "--bits", "2.0"], "with G=2"),  # the graph's smallest G is 2: its floor is higher
    (["--method", "gptq", "--stream", "yes"], "gptq cannot stream"),
], ids=["paper-flag-on-v2", "budget-on-paper", "switch-on-paper", "bits-on-rtn", "zero-budget", "budget-too-low",
        "budget-too-low-for-graph-groups", "stream-gptq"])
def test_flags_that_do_not_go_together(tiny_llama_dir, tmp_path, flags, message):
    proc = run_cli("model", tiny_llama_dir, "--out", tmp_path / "o", *flags)
    assert_one_line_error(proc, message)
    assert leftovers(tmp_path) == []


def test_calibration_text_must_differ_from_eval_text(tiny_llama_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("x\n" * 10)
    proc = run_cli("model", tiny_llama_dir, "--out", tmp_path / "o", "--method", "gptq", "--eval-text", text,
                   "--calib-text", text)
    assert_one_line_error(proc, "must not be the evaluation text")


def test_trt_without_tensorrt_fails_before_any_work(tiny_llama_dir, tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here; this checks the message where it is not")
    proc = run_cli("model", tiny_llama_dir, "--out", tmp_path / "o", "--trt")
    assert_one_line_error(proc, "TensorRT")
    assert leftovers(tmp_path) == []


def test_interrupt_midway_leaves_nothing(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import sage_export.pipeline.sage_v2 as v2

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(v2, "quantize_v2", interrupted)
    assert main(["model", str(tiny_llama_dir), "--out", str(tmp_path / "o"), *FAST]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert leftovers(tmp_path) == []


def test_budget_above_the_ceiling_is_said_in_one_line_before_the_work(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import sage_export.pipeline.sage_v2 as v2

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(v2, "quantize_v2", interrupted)
    assert main(["model", str(tiny_llama_dir), "--out", str(tmp_path / "o"), "--bits", "9", *FAST]) == 130
    notes = [l for l in message_lines(capsys.readouterr().err) if l.startswith("note:")]
    assert len(notes) == 1 and "above the most" in notes[0] and "true bits" in notes[0]


def test_inspect_reads_a_run(tiny_run, capsys):
    assert main(["inspect", str(tiny_run)]) == 0
    assert "true storage" in capsys.readouterr().out


def _checkpoint_with_config(tiny_run, tmp_path, **changes):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_run / "checkpoint", ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt


@pytest.mark.parametrize("changes", [{"num_hidden_layers": 3}, {"intermediate_size": 200}],
                         ids=["missing-block", "wrong-shape"])
def test_export_of_checkpoint_not_matching_its_config(tiny_run, tmp_path, changes):
    ckpt = _checkpoint_with_config(tiny_run, tmp_path, **changes)
    proc = run_cli("export", ckpt, "--out", tmp_path / "onnx")
    assert_one_line_error(proc, "does not match its config.json")
    assert leftovers(tmp_path) == ["ckpt"]


def test_stream_yes_streams_the_paper_preset_and_says_so(tiny_llama_dir, tmp_path):
    out = tmp_path / "o"
    assert main(["model", str(tiny_llama_dir), "--out", str(out), "--preset", "paper", "--fixed-groups", "2",
                 "--graph-samples", "500", "--stream", "yes"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["model"]["streamed"] is True
    assert [s["prompt"] for s in rep["samples"]] == ["The capital of France is"]
    assert "Streamed:" in (out / "report.md").read_text()
    assert rep["onnx"]["checks"]["failures"] == []
    assert rep["bits"]["n_layers"] == 14


def test_default_preset_streamed_writes_the_same_checkpoint_as_in_memory(tiny_llama_dir, tiny_run, tmp_path):
    """`--stream yes` on the default v2 run (self-sampled calibration, statistics, budget, compensation): the
    packed checkpoint is byte for byte the in-memory run's (tiny_run, which auto kept in memory)."""
    out = tmp_path / "s"
    assert main(["model", str(tiny_llama_dir), "--out", str(out), "--seed", "3", "--no-onnx", "--stream", "yes",
                 *FAST]) == 0
    assert json.loads((tiny_run / "report.json").read_text())["model"]["streamed"] is False
    assert json.loads((out / "report.json").read_text())["model"]["streamed"] is True
    streamed, in_memory = load_checkpoint(out / "checkpoint"), load_checkpoint(tiny_run / "checkpoint")
    assert streamed.manifest["files"] == in_memory.manifest["files"]  # sizes and sha256 of packed and float files
    assert list(streamed.layers) == list(in_memory.layers) and len(streamed.layers) == 14
