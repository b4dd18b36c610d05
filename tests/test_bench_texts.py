"""tools/bench_texts.py on the tiny model: one row per variant and text, code read as written and WikiText the
WikiText way, true bits only for quantized rows, reruns replace rows, and the table comes from the JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "tools" / "bench_texts.py"


def test_rows_per_variant_and_text(tiny_llama_dir, tmp_path):
    wiki = tmp_path / "wiki.test.raw"
    wiki.write_text(" = Title = \n The quick brown fox jumps over the lazy dog . \n" * 40)
    code = tmp_path / "code.test.txt"
    code.write_text("def f(x):\n    return x + 1\n\n\nclass A:\n    pass\n" * 40)
    out = tmp_path / "res.json"
    cmd = [sys.executable, str(BENCH), "--model", str(tiny_llama_dir), "--text", f"wiki:{wiki}",
           "--text", f"code:{code}", "--ctx", "32", "--windows", "2", "--out", str(out)]
    proc = subprocess.run(cmd + ["--variants", "fp", "rtn:bits=4,group_size=64"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["variant"], r["text"]) for r in rows) == [
        ("fp", "code:code.test.txt"), ("fp", "wiki:wiki.test.raw"),
        ("rtn-w4g64", "code:code.test.txt"), ("rtn-w4g64", "wiki:wiki.test.raw")]
    for r in rows:
        assert r["n_windows"] == 2 and r["ctx"] == 32 and r["n_tokens"] == 2 * 31 and len(r["window_nll"]) == 2
        assert math.isclose(r["ppl"], math.exp(sum(r["window_nll"]) / r["n_tokens"]), rel_tol=1e-9)
        assert ("true_bits" in r) == (r["variant"] != "fp")
        assert r["command"].startswith("python tools/bench_texts.py ") and r["machine"] and r["date"]
    fp = {r["text"]: r for r in rows if r["variant"] == "fp"}
    # wiki lines are joined with blank lines, code is read as written: the WikiText text is the longer one
    assert fp["wiki:wiki.test.raw"]["text_chars"] > wiki.stat().st_size
    assert fp["code:code.test.txt"]["text_chars"] == code.stat().st_size
    rtn = [r for r in rows if r["variant"] == "rtn-w4g64"]
    assert all(4 < r["true_bits"] < 5 for r in rtn) and all(r["ppl"] != fp[r["text"]]["ppl"] for r in rtn)
    md = out.with_suffix(".md").read_text()
    assert md.count("| rtn-w4g64 |") == 2 and "code:code.test.txt" in md
    proc = subprocess.run(cmd + ["--variants", "fp"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(json.loads(out.read_text())["rows"]) == 4  # replaced, not appended
    proc = subprocess.run([sys.executable, str(BENCH), "--render-only", "--out", str(out), "--note", "a caveat"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["notes"] == ["a caveat"] and len(doc["rows"]) == 4
    md = out.with_suffix(".md").read_text()
    assert "- a caveat" in md and md.index("| fp |") < md.index("| rtn-w4g64 |")  # FP first in each text


def test_sage_v2_calibrated_rows(tiny_llama_dir, tmp_path):
    """SAGE v2 rows: self-sampled by default, --calib-text when given (never an evaluation text); each row names its
    calibration, the same variant with two calibrations is two rows, and G/true bits per layer type are recorded."""
    wiki = tmp_path / "wiki.test.raw"
    wiki.write_text(" = Title = \n The quick brown fox jumps over the lazy dog . \n" * 40)
    dev = tmp_path / "code.dev.txt"
    dev.write_text("def g(y):\n    return [y, y * 2]\n\n\n" * 60)
    out = tmp_path / "res.json"
    cmd = [sys.executable, str(BENCH), "--model", str(tiny_llama_dir), "--text", f"wiki:{wiki}", "--ctx", "32",
           "--windows", "1", "--calib-samples", "4", "--calib-seqlen", "16", "--out", str(out),
           "--variants", "sage:preset=v2,bits=3.2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run(cmd + ["--calib-text", str(dev), "--layers-out", str(tmp_path / "layers")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and {r["variant"] for r in rows} == {"sage-v2(bits=3.2)"}
    by_source = {r["calibration"]["source"]: r for r in rows}
    assert set(by_source) == {"self-generated", "text"}
    assert by_source["text"]["calibration"]["text"] == str(dev)
    for r in rows:
        assert r["calibration"]["tokens"] == 4 * 16 and abs(r["true_bits"] - 3.2) < 0.1
        types = r["layers_by_type"]
        assert "q_proj" in types and "down_proj" in types
        assert sum(t["n"] for t in types.values()) == r["n_layers"]
        assert all(sum(t["G"].values()) == t["n"] for t in types.values())
        assert abs(sum(t["weight_share"] for t in types.values()) - 1) < 1e-9
    assert (tmp_path / "layers" / "sage-v2(bits=3.2).code.dev.txt_4×16.json").is_file()
    md = out.with_suffix(".md").read_text()
    assert "| self-sampled+prompts 4×16 |" in md and "| code.dev.txt 4×16 |" in md and "Chosen G and true bits" in md
    proc = subprocess.run(cmd + ["--calib-text", str(wiki)], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "must not be one of the evaluation texts" in proc.stderr
