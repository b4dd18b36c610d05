"""tools/bench_quality.py, the command behind benchmarks/quality.*, on the tiny model: every row carries its
protocol and command, true bits come from the stored bytes, reruns replace rows, and table and plot come from
the same JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "tools" / "bench_quality.py"


def run_bench(out: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, str(BENCH), "--out", str(out), *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def bench_doc(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quality.json"
    tiny = ("--model", str(tiny_llama_dir), "--ctx", "64")
    run_bench(out, *tiny, "--windows", "2", "--variants", "fp", "rtn:bits=4,group_size=64",
              "sage:fixed_groups=2,graph_samples=500")
    run_bench(out, *tiny, "--windows", "1", "--variants", "rtn:bits=4,group_size=64")
    return out


def test_rows_name_protocol_and_command(bench_doc):
    rows = json.loads(bench_doc.read_text())["rows"]
    assert sorted((r["variant"], r["n_windows"]) for r in rows) == [
        ("fp", 2), ("rtn-w4g64", 1), ("rtn-w4g64", 2), ("sage(fixed_groups=2,graph_samples=500)", 2)]
    for r in rows:
        assert r["ctx"] == 64 and r["ppl"] > 1
        assert r["command"].startswith("python tools/bench_quality.py ") and r["machine"] and r["date"]


def test_true_bits_are_stored_bytes_over_weights(bench_doc):
    rows = {(r["variant"], r["n_windows"]): r for r in json.loads(bench_doc.read_text())["rows"]}
    rtn, sage = rows[("rtn-w4g64", 2)], rows[("sage(fixed_groups=2,graph_samples=500)", 2)]
    for r in (rtn, sage):
        assert r["true_bits"] == pytest.approx(8 * r["packed_bytes"] / r["n_weights"])
        assert r["packed_file_bytes"] >= r["packed_bytes"]  # the file adds its header, never drops a tensor
    # 4-bit codes + a float16 scale and a 4-bit zero-point per 64 weights: the K = 68 and 164 rows of the
    # tiny model end in partial groups, so true bits are above 4 + 20/64.
    assert rtn["true_bits"] > 4 + 20 / 64
    assert sage["true_bits"] > sage["paper_weight_bits"] + sage["paper_scale_bits"]
    assert sage["contract"] == 3 and "contract" not in rtn


def test_table_and_plot_come_from_the_json(bench_doc):
    doc = json.loads(bench_doc.read_text())
    md = bench_doc.with_suffix(".md").read_text()
    for r in doc["rows"]:  # rows of today's op contract carry no mark
        assert f"| {r['variant']} | — | {r['n_windows']} × 64 | {r['ppl']:.2f} |" in md
    png = (bench_doc.parent / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_render_only_regenerates_table_and_plot(bench_doc, tmp_path):
    out = tmp_path / "quality.json"
    out.write_bytes(bench_doc.read_bytes())
    run_bench(out, "--render-only")
    assert out.with_suffix(".md").read_text() == bench_doc.with_suffix(".md").read_text()
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_v2_budgets_share_one_power_choice_and_name_their_calibration(tiny_llama_dir, tmp_path):
    """The default chooses the activation power once, at activation_power_bits whatever the row's budget, so every
    budget finishes one measurement; the validation rows it chose on are named in the calibration label."""
    out = tmp_path / "quality.json"
    run_bench(out, "--model", str(tiny_llama_dir), "--ctx", "64", "--windows", "1", "--variants", "sage:preset=v2",
              "--budgets", "2.5", "3.5", "--calib", "self", "--calib-samples", "4", "--calib-seqlen", "16")
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"sage-v2(bits=2.5)", "sage-v2(bits=3.5)"}
    for budget, r in ((2.5, rows["sage-v2(bits=2.5)"]), (3.5, rows["sage-v2(bits=3.5)"])):
        assert abs(r["true_bits"] - budget) <= 0.05 and r["budget"]["budget_bits"] == budget
        assert r["calibration"]["source"] == "self-generated" and r["calibration"]["tokens"] == 64
        assert r["calibration"]["validation_samples"] == 2
        assert r["budget"]["activation_power_choice"]["budget_bits"] == 3.2
    assert rows["sage-v2(bits=2.5)"]["budget"]["activation_power_choice"] == \
        rows["sage-v2(bits=3.5)"]["budget"]["activation_power_choice"]
    md = out.with_suffix(".md").read_text()
    assert "| sage-v2(bits=2.5) | self-generated+prompts 4×16 +2 validation | 1 × 64 |" in md


def test_rows_of_an_older_contract_are_marked(bench_doc, tmp_path):
    """A SAGE row measured under an older op contract counted its bytes in another layout: the table says so."""
    out = tmp_path / "quality.json"
    doc = json.loads(bench_doc.read_text())
    sage = next(r for r in doc["rows"] if r["method"]["name"] == "sage")
    doc["rows"].append(dict(sage, contract=2, ppl=sage["ppl"] + 1))
    out.write_text(json.dumps(doc))
    run_bench(out, "--render-only")
    md = out.with_suffix(".md").read_text()
    assert f"| {sage['variant']} | — | 2 × 64 | {sage['ppl']:.2f} |" in md
    assert f"| {sage['variant']} [contract v2] | — | 2 × 64 | {sage['ppl'] + 1:.2f} |" in md


def test_second_family_rows_import_test_texts_only_and_compare_with_rtn(bench_doc, tiny_llama_dir, tmp_path):
    """--import-rows copies chosen rows of bench_texts / screen_v2 JSON (test texts only: dev scores chose the
    recipe) into quality.json's second_family and renders each SAGE line against RTN within 0.15 bits."""
    out = tmp_path / "quality.json"
    out.write_bytes(bench_doc.read_bytes())
    stamp = {"ctx": 2048, "commit": "abc", "date": "2026-12-06", "machine": "m", "command": "c"}
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps({"rows": [
        dict(stamp, model="m.gguf", model_name="m.gguf", variant=v, text=t, ppl=p, n_windows=2, true_bits=b)
        for v, b, t, p in (("rtn-w3g64", 3.297, "wiki:wiki.test.raw", 16.0), ("rtn-w3g64", 3.297, "code:code.test.txt", 3.5),
                           ("rtn-w3g64", 3.297, "code:code.dev.txt", 2.8), ("fp", None, "wiki:wiki.test.raw", 13.0))]}))
    screen = tmp_path / "screen.json"
    calib = {"source": "self-generated", "start": "prompts", "samples": 64, "seqlen": 128}
    screen.write_text(json.dumps({"rows": [dict(stamp, model="m.gguf", variant=v, true_bits=3.2, calibration=calib,
                                                contract=c, scores=[
        {"text": "wiki-valid", "role": "dev", "ppl": 10.0, "n_windows": 2},
        {"text": "wiki-test", "role": "test", "ppl": wiki, "n_windows": 2},
        {"text": "code-test", "role": "test", "ppl": 3.6, "n_windows": 2}])
        for v, c, wiki in (("s64", 3, 15.7), ("old", 2, 15.9))]}))
    run_bench(out, "--import-rows", str(texts), "rtn-w3g64", "fp")
    run_bench(out, "--import-rows", str(screen), "sage-v2(bits=3.2)=s64", "sage-v2(bits=3.2)=old")
    family = json.loads(out.read_text())["second_family"]
    assert sorted((r["variant"], r["text"], r.get("contract")) for r in family) == [
        ("fp", "wiki-test", None), ("rtn-w3g64", "code-test", None), ("rtn-w3g64", "wiki-test", None),
        ("sage-v2(bits=3.2)", "code-test", 2), ("sage-v2(bits=3.2)", "code-test", 3),
        ("sage-v2(bits=3.2)", "wiki-test", 2), ("sage-v2(bits=3.2)", "wiki-test", 3)]
    md = out.with_suffix(".md").read_text()
    assert "| sage-v2(bits=3.2) | self-generated+prompts 64×128 | **3.200** | 15.700 | 3.600 |" in md
    assert "| sage-v2(bits=3.2) [contract v2] | self-generated+prompts 64×128 | **3.200** | 15.900 | 3.600 |" in md
    assert ("| sage-v2(bits=3.2) (self-generated+prompts 64×128) at 3.200 | rtn-w3g64 at 3.297 | **SAGE better** | "
            "RTN better |") in md
    run_bench(out, "--import-rows", str(screen), "sage-v2(bits=3.2)=s64")  # a rerun replaces, never duplicates
    assert len(json.loads(out.read_text())["second_family"]) == 7
    run_bench(out, "--model", str(tiny_llama_dir), "--ctx", "64", "--windows", "1", "--variants", "fp")
    assert len(json.loads(out.read_text())["second_family"]) == 7  # measuring SmolLM2-style rows keeps them
