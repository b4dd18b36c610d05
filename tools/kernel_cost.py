#!/usr/bin/env python3
"""Static cost model of the decode/prefill CUDA kernels, read from their compiled SASS.

For every kernel instantiation of plugins/src/{sage_gemv,sage_gemv2,sage_gemv3,sage_tiled}.cu and every requested
architecture it compiles the translation unit to a cubin (nvcc -cubin, ptxas -v for registers and spills), dumps
the SASS with cuobjdump, finds the loops (a backward BRA to an earlier address; body = the target up to the
branch), picks each kernel's main loop from the spec table below, counts its instructions by class and divides by
the weights one thread covers per iteration. A roofline-style bound then turns instructions per weight into a
predicted fraction of copy bandwidth on the GPU of that architecture (formulas in MODEL_TEXT, also written into the
markdown). Nothing here runs a kernel; no GPU is needed.

    python tools/kernel_cost.py                       # sm_87, sm_89, sm_90 -> benchmarks/kernel_cost.{json,md}
    python tools/kernel_cost.py --archs 90 --out /tmp/kc --keep-build

Needs nvcc, and cuobjdump with nvdisasm (cuobjdump --dump-sass calls nvdisasm): the PyPI wheels
nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm of the `test` extra, else both on PATH.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "plugins" / "src"
KEPT_BUILD = REPO / "plugins" / "build-kernel-cost"  # git-ignored (plugins/build*/)
DEFAULT_ARCHS = (87, 89, 90)
JOBS = 2  # nvcc processes at once

# ---------------------------------------------------------------------------------------------------------------
# GPUs: the one this project targets per architecture. Issue rate = SMs x 4 schedulers x 32 lanes x boost clock.
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    clock_ghz: float
    bandwidth_gb_s: float

    @property
    def issue_rate(self) -> float:
        """Lane-instructions per second the SMs can issue (one warp instruction per scheduler per cycle)."""
        return self.sms * 4 * 32 * self.clock_ghz * 1e9


GPUS = {
    87: Gpu("Jetson AGX Orin 64GB", 16, 1.3, 204.8),
    89: Gpu("L40", 142, 2.49, 864.0),
    90: Gpu("H200", 132, 1.98, 4300.0),
}

# ---------------------------------------------------------------------------------------------------------------
# Per-kernel spec table, derived by reading each kernel's source (plugins/src/*_kernel.cuh).
# ---------------------------------------------------------------------------------------------------------------

MAX_PLANES = 4  # kMaxPlanes in sage_gemm_internal.cuh


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    family: str                 # short name used in labels
    key: str                    # unique name of this spec (the JSON's "specs")
    source: str                 # translation unit in plugins/src
    name_re: str                # matches the demangled kernel name
    main_loop: tuple[str, str]  # ("largest" | "smallest", regex on an opcode that the loop must contain)
    weights_per_iter: Callable[[list[str]], int]  # weights one thread covers per main-loop iteration
    weights_why: str
    planes: Callable[[list[str]], int]  # code planes P of the packed stream the counted code reads
    planes_why: str
    weight_load_re: str         # the weight (bit-plane) loads among the loop's opcodes
    # Where the weight loads are: "main" (in the main loop) or "enclosing" (in the smallest loop around the main
    # loop that has them, outside its inner loops), and how many weights one iteration of that loop covers.
    weight_loads_in: str = "main"
    weights_per_weight_loop_iter: Optional[Callable[[list[str]], int]] = None
    inner_trips: Callable[[list[str]], int] = lambda args: 1  # trips of each inner loop per main-loop iteration
    inner_why: str = "no inner loop on the path"
    label: Callable[[list[str]], str] = lambda args: ""
    note: str = ""
    # Path hint: at a forward conditional branch, take it when the fall-through code up to the next branch has an
    # instruction matching this regex (e.g. the zero-fill arm of an `if (out of range) {zero; continue;}`).
    avoid: Optional[str] = None


def _int_arg(args: list[str], i: int) -> int:
    return int(args[i])


def _dtype(args: list[str]) -> str:
    if not args:
        return ""
    return "half" if "half" in args[0] else args[0]


# decode_w_tile's `if (row >= p.n || byte >= p.kb) { zeros; continue; }` is the first arm: shared stores of RZ.
_ZERO_FILL = r"^STS(\.\w+)* \[[^\]]*\], RZ$"

_TILED_INNER = ("activation staging, plane and salient-cursor loops counted once each (their trips differ: "
                "staging 4 (wmma) or 8 (simt) elements per thread, P planes, the step's salient entries): rough")

SPECS: tuple[KernelSpec, ...] = (
    KernelSpec(
        family="gemv",
        key="gemv",
        source="sage_gemv.cu",
        name_re=r"\bgemv::gemv_kernel<",
        # The K-tile loop: it issues the 128-bit weight loads (load_chunk of the next tile), stages x and consumes
        # the current chunk. It is the only loop with LDG.128 (stage_x inside it is a plain-load loop).
        main_loop=("largest", r"^LDG\..*128"),
        # A team of 8 lanes owns one row; a K tile is 1024 columns, so each lane consumes kChunkBytes = 16 bytes of
        # the sign row (and of each plane) = 128 columns of one output row per tile, whatever MT is (the MT
        # activation rows reuse every decoded weight).
        weights_per_iter=lambda args: 128,
        weights_why="team of 8 lanes per row, 1024-column K tile: 16 B = 128 columns of one row per lane per tile",
        # `planes` is a runtime value; the loop holds the decode of all kMaxPlanes planes (if (pl < planes) bodies
        # are on the counted path), so its instruction count matches a P = 4 stream.
        planes=lambda args: MAX_PLANES,
        planes_why="runtime P; the loop holds (and the path runs) the decode of all 4 planes, so P = 4",
        weight_load_re=r"^LDG\..*CONSTANT",  # __ldg of sign/code planes; stage_x uses plain loads
        # stage_x: MT x 1024 activations over 256 threads per tile -> 4·MT trips of its loop.
        inner_trips=lambda args: 4 * _int_arg(args, 1),
        inner_why="stage_x loop: MT x 1024 activations / 256 threads = 4*MT trips per tile",
        label=lambda args: f"gemv {_dtype(args)} MT={args[1]}",
        note="MT = activation rows per pass (1, 2, 4, 8); the cost per weight read grows with MT",
    ),
    KernelSpec(
        family="gemv2",
        key="gemv2",
        source="sage_gemv2.cu",
        name_re=r"\bgemv2::gemv2_kernel<",
        # accumulate_tile's column-word loop (`#pragma unroll 1` over the 4 words of a lane's 128-column chunk):
        # the innermost loop with the 128-bit activation loads (load_x_word). The 128-bit weight loads (load_tile)
        # sit in the enclosing K-tile loop, one per row and plane per 4 iterations of this loop.
        main_loop=("smallest", r"^LDG\..*128"),
        # One word = 32 columns of the lane's chunk, routed into both warp rows (kRowsPerWarp = 2) for one
        # activation row: 64 weights. (Per tile the lane walks 128 columns per plane load: 4 words x 2 rows = 256.)
        weights_per_iter=lambda args: 64,
        weights_why="column-word loop: 32 columns x 2 warp rows, one activation row (4 words = 128 columns "
                    "per plane load)",
        planes=lambda args: _int_arg(args, 1),
        planes_why="template parameter P",
        weight_load_re=r"^LDG\..*CONSTANT",
        weight_loads_in="enclosing",
        # K-tile loop: per lane 2 rows x 128 columns (one 16-byte load per row and plane).
        weights_per_weight_loop_iter=lambda args: 256,
        inner_why="the P = 4 instance keeps its tile in local memory: small copy loops (spills) inside, "
                  "counted once",
        label=lambda args: f"gemv2 {_dtype(args)} P={args[1]}",
        note="counts are for one activation row; each further row repeats the loop",
    ),
    KernelSpec(
        family="gemv3",
        key="gemv3",
        source="sage_gemv3.cu",
        name_re=r"\bgemv3::gemv3_kernel<",
        # gemv3_kernel<P, NB, kTail>: the step loop (`#pragma unroll 1`, step += kWarps) is the one loop with the
        # tensor-core MMAs (consume_step, fully unrolled inside it).
        main_loop=("smallest", r"^HMMA"),
        # One step per thread: lane = 4g + t owns the 128-column piece t of the 512-column step (kPieceCols) for
        # rows g and g + 8 of the 16-row tile: 2 rows x 128 columns = 256 weights (spec from the kernel's author).
        weights_per_iter=lambda args: 256,
        weights_why="one step per thread: 2 rows (g, g + 8) x 128 columns (kPieceCols) = 256 weights",
        planes=lambda args: _int_arg(args, 0),
        planes_why="template parameter P (G <= 8, so P <= 3)",
        # load_chunk: plain 16-byte loads of the prepared buffer, 2 row halves x (1 + P) per step; the activations
        # are __ldg (LDG...CONSTANT) and are not weight loads.
        weight_load_re=r"^LDG(?!.*CONSTANT)",
        label=lambda args: f"gemv3 P={args[0]} NB={args[1]}" + (" tail" if args[2] == "true" else ""),
        note="NB = MMA column blocks of 8 activation rows (1: M <= 8, 2: M <= 16); tail: K % 128 != 0. "
             "The prepared buffer's one-time kernels (prepare_*) are not costed",
    ),
    KernelSpec(
        family="tiled",
        key="tiled_wmma",
        source="sage_tiled.cu",
        name_re=r"\btiled::tiled_wmma_kernel\b",
        main_loop=("largest", r"^HMMA"),  # the K-step loop (k0 += 64)
        # 64 x 64 weight tile decoded by 128 threads per K step: 32 columns (4 bytes of each plane) per thread.
        weights_per_iter=lambda args: 32,
        weights_why="64x64 weight tile per K step / 128 threads = 32 weights (4 bytes per plane) per thread",
        planes=lambda args: MAX_PLANES,
        planes_why="runtime P (plane loop); counted once per byte, compared with a P = 4 stream",
        weight_load_re=r"^LDG\..*U8",  # p.sign[at], p.codes[...]: byte loads
        avoid=_ZERO_FILL,
        inner_why=_TILED_INNER,
        label=lambda args: "tiled wmma (half)",
        note="prefill: the 64 activation rows of an M tile share each decoded weight; the bound is per weight read",
    ),
    KernelSpec(
        family="tiled",
        key="tiled_simt",
        source="sage_tiled.cu",
        name_re=r"\btiled::tiled_simt_kernel\b",
        main_loop=("largest", r"^LDS"),  # the K-step loop (k0 += 32), the outermost loop
        # 64 x 32 weight tile per K step / 256 threads = 8 weights (one byte of each plane) per thread.
        weights_per_iter=lambda args: 8,
        weights_why="64x32 weight tile per K step / 256 threads = 8 weights (1 byte per plane) per thread",
        planes=lambda args: MAX_PLANES,
        planes_why="runtime P (plane loop); counted once per byte, compared with a P = 4 stream",
        weight_load_re=r"^LDG\..*U8",
        avoid=_ZERO_FILL,
        inner_why=_TILED_INNER,
        label=lambda args: "tiled simt (float)",
        note="prefill, float32 activations",
    ),
)

SOURCES = ("sage_gemv.cu", "sage_gemv2.cu", "sage_gemv3.cu", "sage_tiled.cu")

MODEL_TEXT = """\
- **Issue rate** R = SMs x 4 schedulers x 32 lanes x clock (lane-instructions per second; one warp instruction
  per scheduler per cycle, every instruction class counted alike).
- **Instructions per weight** i = (instructions of one main-loop iteration) / (weights one thread covers in it).
- **Bytes per weight** b = (1 + P) / 8: one sign plane plus P code planes, one bit each, for the kernel's own
  stream (P = its template parameter, or the number of planes whose decode the counted code holds). Salient
  entries, scales, row pointers and activations are left out (at 3 % salient weights the entries add about
  0.09 B per weight: 3 B each, 16-bit column and int8 value (contract v3), 4 B in GEMV3's prepared buffer).
- **Issue-limited** weight rate = R / i; **byte-limited** weight rate = bandwidth / b.
- **Predicted fraction of copy bandwidth** = min(1, (R / i) / (bandwidth / b)) = min(1, R·b / (i·bandwidth)).

This is an **upper bound from the steady-state loop alone**: launch, the prologue, K tails, the salient entries,
the epilogue and all latency (memory, dependencies, pipe throughput: LOP3/SHF/FSEL run at half rate on some
pipes) are ignored, and every issue slot is assumed busy with this loop.

Two counts are given for the main loop. **static**: every instruction from the loop label to its backward branch,
as laid out. **path**: one pass through the body following the layout: unconditional branches followed, forward
conditional branches not taken (the body of each `if`, the first arm of each if/else, i.e. the vector-load arms
of these kernels rather than their byte/scalar fallbacks; for the tiled kernels the zero-fill arm of
out-of-range bytes is skipped instead), inner loops counted x their trips per iteration (spec table). The static
count also holds fallback code the steady state never runs; the path count is the better estimate of one
iteration and is what the prediction uses (the static-count prediction is in the JSON).
"""

# ---------------------------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------------------------


class ToolError(RuntimeError):
    pass


def _wheel_binary(dist: str, name: str) -> Optional[Path]:
    """The binary `name` shipped in the installed wheel `dist` (e.g. nvidia/cu13/bin/cuobjdump), if any."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == name and f.parent.name == "bin":
            p = Path(f.locate())
            if p.is_file():
                return p
    try:  # the namespace package, if metadata is missing
        import nvidia  # type: ignore

        for root in getattr(nvidia, "__path__", []):
            for p in sorted(Path(root).glob(f"*/bin/{name}")):
                if p.is_file():
                    return p
    except ImportError:
        pass
    return None


def find_binary(name: str, dist: str) -> Optional[Path]:
    found = _wheel_binary(dist, name)
    if found is not None:
        if not os.access(found, os.X_OK):
            found.chmod(found.stat().st_mode | 0o111)
        return found
    on_path = shutil.which(name)
    return Path(on_path) if on_path else None


@dataclasses.dataclass
class Tools:
    nvcc: Path
    cuobjdump: Path
    nvdisasm: Path
    cxxfilt: Optional[Path]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.nvdisasm.parent}{os.pathsep}{env.get('PATH', '')}"
        return env


def find_tools() -> Tools:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise ToolError("nvcc not found on PATH (the CUDA compiler is needed to build the cubins)")
    cuobjdump = find_binary("cuobjdump", "nvidia-cuda-cuobjdump")
    if cuobjdump is None:
        raise ToolError("cuobjdump not found: pip install nvidia-cuda-cuobjdump==13.5.37 (the `test` extra) "
                        "or put cuobjdump on PATH")
    nvdisasm = find_binary("nvdisasm", "nvidia-cuda-nvdisasm")
    if nvdisasm is None:
        raise ToolError("nvdisasm not found (cuobjdump --dump-sass needs it): pip install "
                        "nvidia-cuda-nvdisasm==13.5.37 (the `test` extra) or put nvdisasm on PATH")
    cxxfilt = shutil.which("c++filt")
    return Tools(Path(nvcc), cuobjdump, nvdisasm, Path(cxxfilt) if cxxfilt else None)


def _version(cmd: list[str], env: Optional[dict[str, str]] = None) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env).stdout
    for line in out.splitlines():
        m = re.search(r"release ([\d.]+), (V[\d.]+)", line)
        if m:
            return f"{m.group(1)} ({m.group(2)})"
    return out.strip().splitlines()[-1] if out.strip() else "unknown"


# ---------------------------------------------------------------------------------------------------------------
# Compiling and parsing ptxas -v
# ---------------------------------------------------------------------------------------------------------------


def compile_cubin(tools: Tools, source: Path, arch: int, build: Path) -> tuple[Path, str]:
    cubin = build / f"sm_{arch}" / (source.stem + ".cubin")
    cubin.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(tools.nvcc), "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", f"-I{SRC}", str(source), "-o",
           str(cubin), "-Xptxas", "-v"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise ToolError(f"nvcc failed for {source.name} sm_{arch}: {res.stderr.strip().splitlines()[-1:]}")
    (cubin.with_suffix(".ptxas.txt")).write_text(res.stderr)
    return cubin, res.stderr


def parse_ptxas(text: str) -> dict[str, dict[str, int]]:
    """Per mangled kernel: registers, stack frame, spill stores/loads (bytes), shared memory (bytes)."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = out.setdefault(m.group(1), {})
            continue
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = out.setdefault(m.group(1), {})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(sm.group(1)) if sm else 0
    return out


# ---------------------------------------------------------------------------------------------------------------
# SASS: parsing, loops, path, classes
# ---------------------------------------------------------------------------------------------------------------

_INSN = re.compile(r"^\s*/\*([0-9a-fA-F]{4,})\*/\s+(.*?)\s*;")
_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_PRED = re.compile(r"^@(!?)(U?P(?:T|\d+))\s+")
# BRA[.mods] [condition operand,] target: "BRA 0x1e0", "BRA P1, 0x1530", "BRA.DIV UR4, 0x7d0", "BRA.U 0x90".
_BRA = re.compile(r"^BRA(?:\.[A-Z.]+)?\s+(!?U?P(?:T|\d+)\s*,\s*|U?R\w+\s*,\s*)?(0x[0-9a-fA-F]+)")


@dataclasses.dataclass(frozen=True)
class Insn:
    addr: int
    text: str     # without the predicate
    pred: str     # "" or e.g. "@!P0"

    @property
    def opcode(self) -> str:
        return self.text.split()[0] if self.text else ""

    @property
    def branch_target(self) -> Optional[int]:
        m = _BRA.match(self.text)
        return int(m.group(2), 16) if m else None

    @property
    def unconditional(self) -> bool:
        """No predicate (or @PT), and for a branch no condition operand (BRA P0, ... / BRA.DIV UR4, ...)."""
        if self.pred not in ("", "@PT", "@UPT"):
            return False
        m = _BRA.match(self.text)
        return not (m and m.group(1))


def parse_sass(text: str) -> dict[str, list[Insn]]:
    """Mangled function name -> its instructions, in address order."""
    funcs: dict[str, list[Insn]] = {}
    current: Optional[list[Insn]] = None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            current = funcs.setdefault(m.group(1), [])
            continue
        m = _INSN.match(line)
        if m and current is not None:
            body = " ".join(m.group(2).split())
            pm = _PRED.match(body)
            pred = ""
            if pm:
                pred = "@" + pm.group(1) + pm.group(2)
                body = body[pm.end():]
            current.append(Insn(int(m.group(1), 16), body, pred))
    return funcs


@dataclasses.dataclass(frozen=True)
class Loop:
    head: int   # index of the first instruction (the branch target)
    tail: int   # index of the last backward branch to head

    @property
    def size(self) -> int:
        return self.tail - self.head + 1

    def contains(self, other: "Loop") -> bool:
        return self.head <= other.head and other.tail <= self.tail and self != other


def find_loops(insns: list[Insn]) -> list[Loop]:
    """One loop per backward-branch target: body = target .. last branch back to it (self-branches, the trap at
    the end of a kernel, are not loops). Sorted by head, then tail."""
    index = {ins.addr: i for i, ins in enumerate(insns)}
    tails: dict[int, int] = {}
    for i, ins in enumerate(insns):
        target = ins.branch_target
        if target is not None and target < ins.addr and target in index:
            head = index[target]
            tails[head] = max(tails.get(head, i), i)
    return sorted((Loop(h, t) for h, t in tails.items()), key=lambda lp: (lp.head, lp.tail))


def load_width(opcode: str) -> Optional[int]:
    """Bytes per lane of a load/store opcode (LDG/LDS/LDL/STL/...), None for other opcodes."""
    if not re.match(r"^(LDG|LDS|LDL|LD|STG|STS|STL|ST|LDC)\b", opcode):
        return None
    mods = opcode.split(".")[1:]
    for mod, width in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if mod in mods:
            return width
    return 4


_WIDTH_NAME = {16: "128", 8: "64", 4: "32", 2: "16", 1: "8"}


def classify(opcode: str) -> str:
    """Instruction class of one opcode: loads and stores by width (LDG.128, LDS.32, LDG.8 ...), LOP3, PRMT, SHF,
    IMAD (all forms, IMAD.MOV included), HMMA, FFMA, FADD, FMUL, FSEL, SEL, ISETP, IADD3, conversions, shuffles,
    branch (BRA/BRX/JMP/CALL/RET/EXIT), sync (BSSY/BSYNC/BAR/WARPSYNC/...), spill (LDL/STL) and other."""
    base = opcode.split(".")[0]
    width = load_width(opcode)
    if base in ("LDL", "STL"):
        return "spill"
    if base in ("LDG", "LDS", "STG", "STS") and width is not None:
        return f"{base}.{_WIDTH_NAME[width]}"
    if base == "LDSM":
        return "LDSM"
    if base in ("LOP3", "PRMT", "SHF", "HMMA", "FFMA", "FADD", "FMUL", "FSEL", "SEL", "ISETP", "IADD3", "IMAD",
                "SHFL", "LEA", "VIADD", "HADD2", "HFMA2", "FSETP"):
        return base
    if base in ("I2F", "F2F", "F2I", "F2FP", "I2FP", "F2IP"):
        return "convert"
    if base in ("BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "BREAK"):
        return "branch"
    if base in ("BSSY", "BSYNC", "BAR", "WARPSYNC", "BMOV", "NOP", "YIELD", "ENDCOLLECTIVE", "DEPBAR"):
        return "sync"
    return "other"


# Classes shown in the markdown's mix table, in order; everything else is summed into "other".
MIX_COLUMNS = ("LDG", "LDS", "LDSM", "spill", "LOP3", "PRMT", "SHF", "IMAD", "HMMA", "FFMA", "FADD", "FSEL",
               "ISETP", "branch")


def mix_of(classes: dict[str, int]) -> dict[str, int]:
    mix = {c: 0 for c in MIX_COLUMNS}
    mix["other"] = 0
    for cls, n in classes.items():
        key = cls.split(".")[0] if cls.startswith(("LDG.", "LDS.")) else cls
        mix[key if key in mix else "other"] += n
    return mix


@dataclasses.dataclass
class Path_:
    indices: list[int]          # instruction indices on the path, each once, in walk order
    weight: dict[int, int]      # index -> times it runs per iteration (inner loops x trips)
    inner_loops: int            # inner loops met on the path
    complete: bool              # reached the loop's back-edge


def _falls_into(insns: list[Insn], i: int, avoid: re.Pattern) -> bool:
    """Whether the straight-line code after instruction i, up to the next branch, has an instruction matching
    avoid."""
    for j in range(i + 1, len(insns)):
        if avoid.search(insns[j].text):
            return True
        if insns[j].branch_target is not None or insns[j].opcode.split(".")[0] in ("EXIT", "RET", "BRX", "JMX"):
            return False
    return False


def walk_path(insns: list[Insn], loop: Loop, inner_trips: int = 1, avoid: Optional[str] = None,
              max_steps: int = 200000) -> Path_:
    """One pass through the loop body following the layout: unconditional branches are followed, conditional ones
    fall through (forward: the `if` body / first if-else arm; backward: an inner loop, counted inner_trips times),
    except a forward one whose fall-through code matches `avoid`, which is taken. Stops at the loop's back-edge;
    EXIT, indirect branches or a cycle leave the path incomplete."""
    index = {ins.addr: i for i, ins in enumerate(insns)}
    avoid_rx = re.compile(avoid) if avoid else None
    i = loop.head
    order: list[int] = []
    seen: set[int] = set()
    weight: dict[int, int] = {}
    inner = 0
    for _ in range(max_steps):
        if i >= len(insns) or i in seen:
            break
        seen.add(i)
        order.append(i)
        weight[i] = 1
        if i == loop.tail:
            return Path_(order, weight, inner, True)
        ins = insns[i]
        op = ins.opcode.split(".")[0]
        if op in ("EXIT", "RET", "BRX", "JMX", "BPT") and ins.unconditional:
            break
        target = ins.branch_target
        if target is not None and target in index:
            if ins.unconditional or (avoid_rx is not None and target > ins.addr
                                     and _falls_into(insns, i, avoid_rx)):
                i = index[target]
                continue
            if target < ins.addr and index[target] >= loop.head:
                # An inner loop's back-edge: everything already on the path from its head runs inner_trips times.
                inner += 1
                t = index[target]
                for j in order:
                    if t <= j <= i:
                        weight[j] *= inner_trips
        i += 1
    return Path_(order, weight, inner, False)


def count_classes(insns: list[Insn], items: dict[int, int]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i, n in items.items():
        cls = classify(insns[i].opcode)
        counts[cls] = counts.get(cls, 0) + n
    return dict(sorted(counts.items()))


def pick_loop(insns: list[Insn], loops: list[Loop], rule: tuple[str, str]) -> Optional[Loop]:
    which, pattern = rule
    rx = re.compile(pattern)
    hits = [lp for lp in loops if any(rx.search(insns[i].opcode) for i in range(lp.head, lp.tail + 1))]
    if not hits:
        return None
    if which == "largest":
        return max(hits, key=lambda lp: (lp.size, -lp.head))
    return min(hits, key=lambda lp: (lp.size, lp.head))


# ---------------------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------------------

_BUILTIN = {"f": "float", "d": "double", "i": "int", "j": "unsigned int", "b": "bool", "c": "char",
            "h": "unsigned char", "s": "short", "t": "unsigned short", "l": "long", "m": "unsigned long", "v": "void"}


def _mangled_name(mangled: str) -> tuple[list[str], Optional[list[str]]]:
    """Nested name parts and template arguments of a simple Itanium-mangled kernel name, e.g.
    _ZN4sage4gemv11gemv_kernelI6__halfLi8EEEvNS_7ProblemEb -> (['sage', 'gemv', 'gemv_kernel'], ['__half', '8']).
    Template arguments: types by name or builtin letter, integer literals; None if absent or not that simple."""
    s, pieces, i = mangled, [], 3
    if not s.startswith("_ZN"):
        return [], None
    while i < len(s) and s[i].isdigit():
        nm = re.match(r"\d+", s[i:])
        start = i + nm.end()
        pieces.append(s[start:start + int(nm.group())])
        i = start + int(nm.group())
    if i >= len(s) or s[i] != "I":
        return pieces, None
    i, args = i + 1, []
    while i < len(s) and s[i] != "E":
        if s[i] == "L":
            lm = re.match(r"L([a-z])(n?)(\d+)E", s[i:])
            if not lm:
                return pieces, None
            value = ("-" if lm.group(2) else "") + lm.group(3)
            if lm.group(1) == "b":
                value = "true" if value == "1" else "false"
            args.append(value)
            i += lm.end()
        elif s[i].isdigit():
            nm = re.match(r"\d+", s[i:])
            start = i + nm.end()
            args.append(s[start:start + int(nm.group())])
            i = start + int(nm.group())
        elif s[i] in _BUILTIN:
            args.append(_BUILTIN[s[i]])
            i += 1
        else:
            return pieces, None
    return pieces, args


def split_template_args(demangled: str) -> list[str]:
    """['__half', '8'] from 'void sage::gemv::gemv_kernel<__half, 8>(sage::Problem, bool)'."""
    start = demangled.find("<")
    if start < 0:
        return []
    depth, cur, args = 0, "", []
    for ch in demangled[start + 1:]:
        if ch == "<":
            depth += 1
        elif ch == ">":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        args.append(cur.strip())
    return args


def demangle_all(names: list[str], tools: Tools) -> dict[str, str]:
    if tools.cxxfilt is None or not names:
        return {}
    res = subprocess.run([str(tools.cxxfilt)], input="\n".join(names) + "\n", capture_output=True, text=True)
    lines = res.stdout.splitlines()
    return dict(zip(names, lines)) if res.returncode == 0 and len(lines) == len(names) else {}


def readable(mangled: str, demangled: Optional[str]) -> tuple[str, list[str]]:
    """(name to match the spec against, template arguments)."""
    if demangled and demangled != mangled:
        return demangled, split_template_args(demangled)
    pieces, parsed = _mangled_name(mangled)
    args = parsed or []
    name = "::".join(pieces) + (f"<{', '.join(args)}>" if args else "") if pieces else mangled
    return name, args


# ---------------------------------------------------------------------------------------------------------------
# Analysis of one kernel
# ---------------------------------------------------------------------------------------------------------------


def spec_for(name: str) -> Optional[KernelSpec]:
    for spec in SPECS:
        if re.search(spec.name_re, name):
            return spec
    return None


def predict(gpu: Gpu, instr_per_weight: Optional[float], bytes_per_weight: float) -> Optional[dict[str, float]]:
    if not instr_per_weight:
        return None
    issue = gpu.issue_rate / instr_per_weight
    byte = gpu.bandwidth_gb_s * 1e9 / bytes_per_weight
    return {"issue_limited_gweights_per_s": round(issue / 1e9, 1),
            "byte_limited_gweights_per_s": round(byte / 1e9, 1),
            "issue_over_byte_limit": round(issue / byte, 4),
            "fraction_of_bandwidth": round(min(1.0, issue / byte), 4)}


def analyse_kernel(insns: list[Insn], spec: KernelSpec, args: list[str], arch: int) -> dict:
    loops = find_loops(insns)
    loop = pick_loop(insns, loops, spec.main_loop)
    row: dict = {"loops_found": len(loops)}
    weights = spec.weights_per_iter(args)
    planes = spec.planes(args)
    bytes_per_weight = (1 + planes) / 8
    row.update(weights_per_iter=weights, planes=planes, bytes_per_weight=bytes_per_weight)
    if loop is None:
        row["loop"] = None
        return row
    trips = spec.inner_trips(args)
    path = walk_path(insns, loop, trips, spec.avoid)
    static_items = {i: 1 for i in range(loop.head, loop.tail + 1)}
    path_total = sum(path.weight.values()) if path.complete else None
    ld_rx = re.compile(spec.weight_load_re)

    # The weight loads: on the main loop's path, or on the path of the smallest enclosing loop that has them
    # outside its own inner loops.
    weight_loads: list[int] = []
    covered = weights
    where = "main loop"
    if spec.weight_loads_in == "main":
        weight_loads = [i for i in path.indices if ld_rx.search(insns[i].opcode)]
    else:
        for outer in sorted((lp for lp in loops if lp.contains(loop)), key=lambda lp: lp.size):
            inner = [lp for lp in loops if outer.contains(lp)]
            opath = walk_path(insns, outer, 1, spec.avoid)
            hits = [i for i in opath.indices if ld_rx.search(insns[i].opcode)
                    and not any(lp.head <= i <= lp.tail for lp in inner)]
            if hits:
                weight_loads = hits
                covered = spec.weights_per_weight_loop_iter(args) if spec.weights_per_weight_loop_iter else weights
                where = f"enclosing loop {insns[outer.head].addr:#06x}-{insns[outer.tail].addr:#06x}"
                break
    widths = [load_width(insns[i].opcode) or 0 for i in weight_loads]
    global_loads = [(i, n) for i, n in path.weight.items() if insns[i].opcode.startswith("LDG")]

    row["loop"] = {
        "start": f"{insns[loop.head].addr:#06x}",
        "end": f"{insns[loop.tail].addr:#06x}",
        "static_instructions": loop.size,
        "path_instructions": path_total,
        "path_complete": path.complete,
        "inner_loops_on_path": path.inner_loops,
        "inner_trips": trips,
        "static_classes": count_classes(insns, static_items),
        "path_classes": count_classes(insns, path.weight) if path.complete else None,
    }
    row["instr_per_weight_static"] = round(loop.size / weights, 3)
    row["instr_per_weight_path"] = round(path_total / weights, 3) if path_total else None
    row["weight_loads"] = {
        "where": where,
        "opcodes": sorted({insns[i].opcode for i in weight_loads}),
        "per_iteration": len(weight_loads),
        "width_bytes": max(widths) if widths else None,
        "weights_covered": covered,
        "bytes_per_weight_loaded": round(sum(widths) / covered, 4) if widths else None,
    }
    row["global_load_bytes_per_weight_main_loop"] = (
        round(sum((load_width(insns[i].opcode) or 0) * n for i, n in global_loads) / weights, 4)
        if path.complete else None)
    gpu = GPUS.get(arch)
    if gpu is not None:
        row["gpu"] = gpu.name
        row["issue_rate_lane_instr_per_s"] = gpu.issue_rate
        row["predicted_path"] = predict(gpu, row["instr_per_weight_path"], bytes_per_weight)
        row["predicted_static"] = predict(gpu, row["instr_per_weight_static"], bytes_per_weight)
    return row


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------


def spec_summary(spec: KernelSpec) -> dict:
    return {"source": spec.source, "name": spec.name_re,
            "main_loop": f"{spec.main_loop[0]} loop containing /{spec.main_loop[1]}/",
            "weights_per_iter": spec.weights_why, "planes": spec.planes_why,
            "weight_loads": f"/{spec.weight_load_re}/ in the " + (
                "main loop" if spec.weight_loads_in == "main" else "smallest enclosing loop that has them"),
            "inner_loops": spec.inner_why, "path_avoid": spec.avoid, "note": spec.note}


def natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def run(archs: list[int], out_dir: Path, keep_build: bool, command: str) -> dict:
    tools = find_tools()
    env = tools.env()
    present = [s for s in SOURCES if (SRC / s).is_file()]
    notes = [f"{s}: not present in plugins/src, skipped" for s in SOURCES if s not in present]

    build = KEPT_BUILD if keep_build else Path(tempfile.mkdtemp(prefix="kernel_cost_"))
    if keep_build and build.exists():
        shutil.rmtree(build)
    build.mkdir(parents=True, exist_ok=True)
    try:
        jobs = [(s, a) for a in archs for s in present]
        results: dict[tuple[str, int], tuple[Path, str]] = {}
        failures: list[str] = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=JOBS) as pool:
            futures = {pool.submit(compile_cubin, tools, SRC / s, a, build): (s, a) for s, a in jobs}
            for fut in concurrent.futures.as_completed(futures):
                key = futures[fut]
                try:
                    results[key] = fut.result()
                except ToolError as exc:
                    failures.append(str(exc))
        if failures:
            raise ToolError("; ".join(sorted(failures)))

        kernels: list[dict] = []
        for source in present:
            for arch in archs:
                cubin, ptxas_text = results[(source, arch)]
                sass = subprocess.run([str(tools.cuobjdump), "--dump-sass", str(cubin)], capture_output=True,
                                      text=True, env=env)
                if sass.returncode != 0:
                    raise ToolError(f"cuobjdump --dump-sass failed on {cubin.name}: "
                                    f"{(sass.stderr.strip().splitlines() or ['?'])[-1]}")
                if keep_build:
                    cubin.with_suffix(".sass").write_text(sass.stdout)
                funcs = parse_sass(sass.stdout)
                ptxas = parse_ptxas(ptxas_text)
                demangled = demangle_all(sorted(funcs), tools)
                for mangled, insns in funcs.items():
                    name, args = readable(mangled, demangled.get(mangled))
                    spec = spec_for(name)
                    if spec is None:
                        notes.append(f"{source}: {name}: no spec in the table, not costed")
                        continue
                    res = ptxas.get(mangled, {})
                    row = {
                        "kernel": spec.label(args) or name,
                        "family": spec.family,
                        "source": source,
                        "arch": f"sm_{arch}",
                        "name": name,
                        "mangled": mangled,
                        "template_args": args,
                        "registers": res.get("registers"),
                        "spill_stores": res.get("spill_stores"),
                        "spill_loads": res.get("spill_loads"),
                        "stack_frame": res.get("stack"),
                        "smem_static": res.get("smem"),
                        "instructions": len(insns),
                        "spec": spec.key,
                    }
                    row.update(analyse_kernel(insns, spec, args, arch))
                    kernels.append(row)
        order = {s: i for i, s in enumerate(SOURCES)}
        kernels.sort(key=lambda r: (order[r["source"]], natural_key(r["kernel"]), int(r["arch"][3:])))
    finally:
        if not keep_build:
            shutil.rmtree(build, ignore_errors=True)

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "nvcc": _version([str(tools.nvcc), "--version"]),
        "cuobjdump": _version([str(tools.cuobjdump), "--version"]),
        "nvdisasm": _version([str(tools.nvdisasm), "--version"]),
        "archs": [f"sm_{a}" for a in archs],
        "gpus": {f"sm_{a}": dataclasses.asdict(GPUS[a]) | {"issue_rate_lane_instr_per_s": GPUS[a].issue_rate}
                 for a in archs if a in GPUS},
        "model": MODEL_TEXT,
        "specs": {spec.key: spec_summary(spec) for spec in SPECS},
        "notes": sorted(set(notes)),
        "kernels": kernels,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kernel_cost.json").write_text(to_json(report))
    (out_dir / "kernel_cost.md").write_text(render_md(report))
    if keep_build:
        print(f"build kept in {build}")
    return report


def to_json(report: dict) -> str:
    """Indented JSON, but one line per kernel row (readable diffs, a tenth of the size)."""
    head = {k: v for k, v in report.items() if k != "kernels"}
    text = json.dumps(head, indent=1)
    rows = ",\n".join("  " + json.dumps(r, separators=(",", ":")) for r in report["kernels"])
    return text[:-2] + ',\n "kernels": [\n' + rows + "\n ]\n}\n"


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pct(pred: Optional[dict]) -> str:
    if not pred:
        return "-"
    if pred["issue_over_byte_limit"] > 1:
        return f"100% (issue {pred['issue_over_byte_limit']:.1f}x)"
    return f"{100 * pred['fraction_of_bandwidth']:.0f}%"


def render_md(report: dict) -> str:
    lines = [
        "# Static cost model of the SageBinaryGemm kernels (from SASS)",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- nvcc: {report['nvcc']}; cuobjdump: {report['cuobjdump']}; nvdisasm: {report['nvdisasm']}",
        "- GPUs: " + "; ".join(f"{a}: {g['name']}, {g['sms']} SMs, {g['clock_ghz']} GHz, {g['bandwidth_gb_s']} GB/s "
                                f"(issue rate {g['issue_rate_lane_instr_per_s'] / 1e12:.2f} T lane-instr/s)"
                                for a, g in report["gpus"].items()),
        "- static analysis only: nothing here ran on a GPU; measured speeds come from `tools/gpu_check.sh` "
        "(`benchmarks/kernels.md`; the first H200 run is in `benchmarks/gpu_baseline/`)",
        "",
        "## Model",
        "",
        report["model"].rstrip(),
        "",
        "## Kernels",
        "",
        "Cells with two numbers are *path / static*. `spills` = spill stores/loads bytes (stack frame bytes). "
        "`weight load` = bytes per weight-load instruction per lane, and weight bytes loaded per weight. The "
        "predicted % of bandwidth uses the path count and the GPU of that architecture.",
        "",
        "| kernel | arch | regs | spills | loop instr | weights/iter | instr/weight | weight load | bytes/weight (P) "
        "| predicted % of BW |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["kernels"]:
        loop = r.get("loop")
        wl = r.get("weight_loads") or {}
        spills = f"{_fmt(r['spill_stores'])}/{_fmt(r['spill_loads'])} ({_fmt(r['stack_frame'])})"
        if loop:
            instr = f"{_fmt(loop['path_instructions'])} / {loop['static_instructions']}"
            ipw = f"{_fmt(r['instr_per_weight_path'])} / {_fmt(r['instr_per_weight_static'])}"
            load = (f"{_fmt(wl.get('width_bytes'))} B, {_fmt(wl.get('bytes_per_weight_loaded'), 3)} B/w"
                    if wl.get("width_bytes") else "-")
        else:
            instr, ipw, load = "no loop found", "-", "-"
        lines.append(f"| {r['kernel']} | {r['arch']} | {_fmt(r['registers'])} | {spills} | {instr} | "
                     f"{r['weights_per_iter']} | {ipw} | {load} | {r['bytes_per_weight']:.3f} ({r['planes']}) | "
                     f"{_pct(r.get('predicted_path'))} |")
    last = report["archs"][-1] if report["archs"] else None
    if last:
        lines += ["", f"## Instruction mix of one main-loop iteration ({last}, path count)", "",
                  "| kernel | " + " | ".join(MIX_COLUMNS) + " | other | total |",
                  "|---|" + "---|" * (len(MIX_COLUMNS) + 2)]
        for r in report["kernels"]:
            loop = r.get("loop")
            if r["arch"] != last or not loop or not loop["path_classes"]:
                continue
            mix = mix_of(loop["path_classes"])
            lines.append(f"| {r['kernel']} | " + " | ".join(str(mix[c]) for c in MIX_COLUMNS) +
                         f" | {mix['other']} | {loop['path_instructions']} |")
    lines += ["", "## What each kernel's numbers mean", ""]
    seen = set()
    for spec in SPECS:
        if spec.source not in {r["source"] for r in report["kernels"]} or (spec.family, spec.name_re) in seen:
            continue
        seen.add((spec.family, spec.name_re))
        lines.append(f"- **{spec.family}** (`{spec.source}`, `{spec.name_re}`): main loop = {spec.main_loop[0]} "
                     f"loop containing `{spec.main_loop[1]}`; weights/iter: {spec.weights_why}; P: {spec.planes_why}; "
                     f"inner loops: {spec.inner_why}." + (f" {spec.note}." if spec.note else ""))
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def parse_archs(text: str) -> list[int]:
    archs = []
    for tok in text.split(","):
        tok = tok.strip().lower().removeprefix("sm_")
        if not tok.isdigit():
            raise argparse.ArgumentTypeError(f"bad architecture {tok!r} (want e.g. 87,89,90)")
        archs.append(int(tok))
    return sorted(set(archs))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks", help="output folder (default benchmarks)")
    ap.add_argument("--archs", type=parse_archs, default=list(DEFAULT_ARCHS),
                    help="comma-separated SM architectures (default 87,89,90)")
    ap.add_argument("--keep-build", action="store_true",
                    help=f"keep cubins, ptxas logs and SASS in {KEPT_BUILD.relative_to(REPO)}")
    args = ap.parse_args(argv)
    raw = sys.argv[1:] if argv is None else argv
    command = " ".join(["python", "tools/kernel_cost.py", *raw])
    try:
        report = run(args.archs, args.out, args.keep_build, command)
    except ToolError as exc:
        print(f"kernel_cost: {exc}", file=sys.stderr)
        return 2
    print(f"{len(report['kernels'])} kernel rows -> {args.out / 'kernel_cost.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
