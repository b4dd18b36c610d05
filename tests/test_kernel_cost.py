"""tools/kernel_cost.py: the SASS loop finder, path walk and instruction classes on a hand-written snippet, and one
real run on sm_90 (nvcc; cuobjdump and nvdisasm from the `test` extra). No GPU needed."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "kernel_cost.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("kernel_cost", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernel_cost"] = module
    spec.loader.exec_module(module)
    return module


kc = _load_tool()

# A kernel as cuobjdump --dump-sass prints it: an outer loop 0x30..0x150 holding an if/else (vector arm first,
# byte arm second), an inner loop 0x100..0x120 and a BRA with a condition operand; the end trap 0x170 branches to
# itself and is no loop.
SNIPPET = """
\tcode for sm_90
\t\tFunction : _ZN4sage4gemv11gemv_kernelI6__halfLi2EEEvNS_7ProblemEb
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                  /* 0x00000a00ff017b82 */
                                                                           /* 0x000fe20000000800 */
        /*0010*/                   S2R R4, SR_TID.X ;                      /* 0x0000000000047919 */
        /*0020*/                   ISETP.NE.AND P5, PT, R4, RZ, PT ;       /* 0x0000000000047919 */
        /*0030*/              @!P5 BRA 0x70 ;                              /* 0x0000000000047919 */
        /*0040*/                   LDG.E.128.CONSTANT R8, desc[UR4][R2.64] ;
        /*0050*/                   LOP3.LUT R5, R8, 0xff, RZ, 0xc0, !PT ;
        /*0060*/                   BRA 0xc0 ;
        /*0070*/               @P0 LDG.E.U8.CONSTANT R8, desc[UR4][R2.64] ;
        /*0080*/                   LDG.E.U8.CONSTANT R9, desc[UR4][R2.64+0x1] ;
        /*0090*/                   PRMT R5, R8, 0x3340, R9 ;
        /*00a0*/                   SHF.R.U32.HI R6, RZ, 0x1, R5 ;
        /*00b0*/                   LDS.U16 R7, [R6] ;
        /*00c0*/                   IMAD.MOV.U32 R10, RZ, RZ, R5 ;
        /*00d0*/              @!P1 BRA P2, 0x100 ;
        /*00e0*/                   FFMA R11, R5, R10, R11 ;
        /*00f0*/                   FADD R12, R12, R11 ;
        /*0100*/                   HMMA.16816.F32 R12, R4, R8, R12 ;
        /*0110*/                   LDS.128 R16, [R6] ;
        /*0120*/               @P3 BRA 0x100 ;
        /*0130*/                   STL [R1], R16 ;
        /*0140*/                   ISETP.GE.AND P4, PT, R4, 0x10, PT ;
        /*0150*/               @P4 BRA 0x30 ;
        /*0160*/                   EXIT ;
        /*0170*/                   BRA 0x170;
        /*0180*/                   NOP;
\t\t..........
"""


def test_parse_loops_and_path_on_a_snippet() -> None:
    funcs = kc.parse_sass(SNIPPET)
    assert list(funcs) == ["_ZN4sage4gemv11gemv_kernelI6__halfLi2EEEvNS_7ProblemEb"]
    insns = funcs["_ZN4sage4gemv11gemv_kernelI6__halfLi2EEEvNS_7ProblemEb"]
    assert len(insns) == 25 and insns[0].addr == 0 and insns[-1].opcode == "NOP"
    assert insns[3].pred == "@!P5" and insns[3].branch_target == 0x70 and not insns[3].unconditional
    assert insns[6].branch_target == 0xC0 and insns[6].unconditional
    assert insns[13].branch_target == 0x100 and not insns[13].unconditional  # BRA P2, target: conditional

    loops = kc.find_loops(insns)
    spans = [(insns[lp.head].addr, insns[lp.tail].addr) for lp in loops]
    assert spans == [(0x30, 0x150), (0x100, 0x120)]  # the self-branch trap at 0x170 is not a loop
    outer, inner = loops
    assert outer.size == 19 and inner.size == 3 and outer.contains(inner) and not inner.contains(outer)
    assert kc.pick_loop(insns, loops, ("largest", r"^HMMA")) == outer
    assert kc.pick_loop(insns, loops, ("smallest", r"^HMMA")) == inner
    assert kc.pick_loop(insns, loops, ("smallest", r"^LDG\..*128")) == outer
    assert kc.pick_loop(insns, loops, ("largest", r"^DMMA")) is None

    # Path: 0x30 (branch not taken) -> vector arm 0x40..0x60 -> jump to 0xc0 -> 0xd0 (not taken) -> 0xe0..0x150,
    # the inner loop 0x100..0x120 counted 4 times. The byte arm 0x70..0xb0 is off the path.
    path = kc.walk_path(insns, outer, inner_trips=4)
    assert path.complete and path.inner_loops == 1
    assert [insns[i].addr for i in path.indices] == [0x30, 0x40, 0x50, 0x60, 0xC0, 0xD0, 0xE0, 0xF0, 0x100, 0x110,
                                                     0x120, 0x130, 0x140, 0x150]
    assert sum(path.weight.values()) == 11 + 3 * 4
    classes = kc.count_classes(insns, path.weight)
    assert classes == {"FADD": 1, "FFMA": 1, "HMMA": 4, "IMAD": 1, "ISETP": 1, "LDG.128": 1, "LDS.128": 4,
                       "LOP3": 1, "branch": 4 + 4, "spill": 1}
    # Taking a branch whose fall-through matches `avoid`: the vector arm is avoided, the byte arm taken.
    avoided = kc.walk_path(insns, outer, avoid=r"^LDG\.E\.128")
    assert 0x70 in [insns[i].addr for i in avoided.indices] and 0x40 not in [insns[i].addr for i in avoided.indices]

    static = kc.count_classes(insns, {i: 1 for i in range(outer.head, outer.tail + 1)})
    assert static["LDG.8"] == 2 and static["PRMT"] == 1 and static["SHF"] == 1 and static["LDS.16"] == 1
    assert sum(static.values()) == outer.size


def test_classes_widths_and_names() -> None:
    assert kc.load_width("LDG.E.128.CONSTANT") == 16
    assert kc.load_width("LDG.E.64") == 8
    assert kc.load_width("LDG.E") == 4
    assert kc.load_width("LDG.E.U16") == 2 and kc.load_width("LDG.E.S8") == 1
    assert kc.load_width("FFMA") is None
    assert kc.classify("LDG.E.U8.CONSTANT") == "LDG.8"
    assert kc.classify("LDS.128") == "LDS.128"
    assert kc.classify("LDSM.16.M88.4") == "LDSM"
    assert kc.classify("LOP3.LUT") == "LOP3" and kc.classify("PRMT") == "PRMT"
    assert kc.classify("SHF.R.U32.HI") == "SHF" and kc.classify("IMAD.MOV.U32") == "IMAD"
    assert kc.classify("HMMA.16816.F32") == "HMMA" and kc.classify("FFMA") == "FFMA"
    assert kc.classify("BRA.DIV") == "branch" and kc.classify("BSYNC") == "sync"
    assert kc.classify("LDL.LU") == "spill" and kc.classify("STL.128") == "spill"
    assert kc.classify("POPC") == "other"

    name, args = kc.readable("_ZN4sage5gemv212gemv2_kernelI6__halfLi4EEEvNS_7ProblemEibb", None)
    assert name == "sage::gemv2::gemv2_kernel<__half, 4>" and args == ["__half", "4"]
    assert kc.spec_for(name).family == "gemv2"
    name, args = kc.readable("_ZN4sage5gemv312gemv3_kernelILi2ELi1ELb1EEEvNS_7ProblemENS0_6LayoutEPKj", None)
    assert args == ["2", "1", "true"] and kc.spec_for(name).label(args) == "gemv3 P=2 NB=1 tail"
    assert kc.split_template_args("void sage::gemv::gemv_kernel<float, 8>(sage::Problem, bool)") == ["float", "8"]
    assert kc.spec_for("sage::tiled::tiled_wmma_kernel(sage::Problem, bool)").label([]) == "tiled wmma (half)"
    assert kc.spec_for("sage::gemv3::prepare_dense_kernel(sage::Problem)") is None


def test_prediction_formula() -> None:
    h200 = kc.GPUS[90]
    assert h200.issue_rate == pytest.approx(132 * 4 * 32 * 1.98e9)
    # 4 instructions per weight at P = 0: issue-limited 8.36e12 weights/s, byte-limited 4.3e12 / 0.125 = 34.4e12.
    pred = kc.predict(h200, 4.0, 0.125)
    assert pred["fraction_of_bandwidth"] == pytest.approx(132 * 128 * 1.98e9 / 4 / (4300e9 / 0.125), abs=1e-4)
    assert kc.predict(h200, 0.5, 0.625)["fraction_of_bandwidth"] == 1.0
    assert kc.predict(h200, None, 0.125) is None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs the CUDA compiler (nvcc)")
def test_real_run_sm90(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(TOOL), "--archs", "90", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernel_cost.json", "kernel_cost.md"]
    report = json.loads((tmp_path / "kernel_cost.json").read_text())
    assert report["archs"] == ["sm_90"] and report["date"] and "--archs 90" in report["command"]
    assert report["nvcc"] != "unknown" and report["cuobjdump"] != "unknown"
    rows = report["kernels"]
    md = (tmp_path / "kernel_cost.md").read_text()
    for family, count in (("gemv", 8), ("gemv2", 10)):
        fam = [r for r in rows if r["family"] == family]
        assert len(fam) == count, [r["kernel"] for r in fam]
        for r in fam:
            assert r["arch"] == "sm_90" and r["registers"] > 0 and r["spill_stores"] is not None
            loop = r["loop"]
            assert loop is not None and loop["static_instructions"] > 50 and loop["path_complete"]
            assert 0 < loop["path_instructions"]
            assert r["instr_per_weight_static"] > 0 and r["instr_per_weight_path"] > 0
            assert r["weight_loads"]["width_bytes"] == 16  # 128-bit weight loads (vector path)
            assert r["weight_loads"]["bytes_per_weight_loaded"] == pytest.approx(r["bytes_per_weight"])
            assert 0 < r["predicted_path"]["fraction_of_bandwidth"] <= 1
            assert f"| {r['kernel']} | sm_90 | {r['registers']} |" in md
    # GEMV holds the decode of every plane in one loop: far more instructions per weight than GEMV2 at P = 0.
    gemv = next(r for r in rows if r["kernel"] == "gemv half MT=1")
    gemv2 = next(r for r in rows if r["kernel"] == "gemv2 half P=0")
    assert gemv["instr_per_weight_path"] > 2 * gemv2["instr_per_weight_path"]
    assert gemv["loop"]["path_classes"]["LDG.128"] == 5  # sign + 4 planes, no byte fallback on the path
    if (REPO / "plugins" / "src" / "sage_gemv3.cu").is_file():
        assert any(r["family"] == "gemv3" and r["loop"] and r["loop"]["path_classes"].get("HMMA") for r in rows)
    else:
        assert any("sage_gemv3.cu" in n for n in report["notes"])
    assert "upper bound from the steady-state loop alone" in md
