#!/usr/bin/env python3
"""Decode speed at batch 1: float16 against SAGE kernels.

On a GPU (default) the decode step is the model's linear layers at batch 1, in the order a decoder runs them
(q, k, v, o, gate, up, down per block, then lm_head in float16 for both variants), replayed from one CUDA graph;
attention over the KV cache, norms and the embedding lookup are left out (said in the table). SAGE weights are
random packed layers made on the GPU at about 3.2 true bits (G = 4, 0.5 % salient): speed does not depend on
their values. `--hf` times the Hugging Face model instead (eager, with its KV cache; on CPU it is the smoke run).

Reports tokens/s and achieved GB/s of weight bytes read per token (every quantized layer in its stored form plus
the float16 tensors a decode step reads: norms and lm_head; the KV cache is left out, and said so). Weights of the
SAGE variant are random packed layers of the model's shapes: decode speed does not depend on their values.
Results go to benchmarks/decode.json + decode.md with device, date and command.

    python tools/bench_decode.py --model llama7b                   # on a GPU: linear stack, CUDA graphs
    python tools/bench_decode.py --device cpu --model tiny --tokens 4 --out /tmp/d.json   # smoke run, CPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sage_export.models import quantizable_linears  # noqa: E402
from sage_export.models.architectures import LLAMA  # noqa: E402
from sage_export.runtime.sage_linear import pointer_or_null, prepared_buffer, replace_linears  # noqa: E402
from sage_export.runtime.synthetic import random_packed_linear  # noqa: E402

SHAPES = {  # LlamaConfig overrides of the benchmarked models
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False),
}


def build_dense(name: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.float16 if device == "cuda" else torch.float32
    if name == "smollm2":
        from sage_export.models import load_model

        return load_model(None).model.to(device=device, dtype=dtype).eval()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[name], max_position_embeddings=4096))
    return model.to(dtype).eval()


def make_sage(model, n_groups: int, row_multipliers: bool):
    linears = quantizable_linears(model, LLAMA)
    packed = {n: random_packed_linear(l.out_features, l.in_features, n_groups, row_scales=row_multipliers, seed=i)
              for i, (n, l) in enumerate(linears.items())}
    replace_linears(model, packed)
    return model


def bytes_per_token(model) -> int:
    """Bytes of weights a decode step reads: everything but the embedding table (one row of it is read),
    unless lm_head shares it."""
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or (t is emb and not tied):
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def decode_tokens_per_s(model, device: str, prompt_len: int, n_tokens: int, warmup: int = 3) -> float:
    """Greedy decode with a KV cache, eager mode (CUDA graphs are not used: SageLinear launches through ctypes)."""
    from transformers import DynamicCache

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=device)
    for run in range(2):  # first run warms up kernels and allocator
        cache = DynamicCache()
        out = model(ids, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        steps = warmup if run == 0 else n_tokens
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            out = model(tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        sync()
        elapsed = time.perf_counter() - start
    return n_tokens / elapsed


def random_packed_cuda(n: int, k: int, groups: int, fraction: float, gen: torch.Generator,
                       row_multipliers: bool, dev: str = "cuda") -> dict:
    """A valid packed layer (contract v3) made on the GPU in milliseconds: random bits and codes (G a power of
    two, so every code is valid), `fraction` salient weights per row at evenly spaced, randomly offset columns.
    Row multipliers r_n in [0.5, 2) only when asked: the default recipe stores none (an empty row_scales), and the
    kernels then skip their load, so a benchmark with them would time a layout default runs never write."""
    kb, planes = (k + 7) // 8, max(0, (groups - 1).bit_length())
    per_row = max(0, round(fraction * k))
    stride = k // per_row if per_row else 1
    offsets = torch.randint(0, stride, (n, 1), generator=gen, device=dev)
    cols = (torch.arange(per_row, device=dev) * stride + offsets).reshape(-1)
    # Contract v3: int8 [nnz, 2], each column's uint16 little-endian (through uint8: 128..255 wrap as intended).
    cols = torch.stack([cols & 0xFF, cols >> 8], dim=-1).to(torch.uint8).view(torch.int8)
    return {"sign_bits": torch.randint(-128, 128, (n, kb), generator=gen, device=dev, dtype=torch.int8),
            "group_codes": torch.randint(-128, 128, (planes, n, kb), generator=gen, device=dev, dtype=torch.int8),
            "group_scales": (torch.rand(groups, generator=gen, device=dev) * 0.02 + 0.001).half(),
            "salient_rowptr": (torch.arange(n + 1, device=dev) * per_row).to(torch.int32),
            "salient_cols": cols,
            "salient_q": torch.randint(-7, 8, (n * per_row,), generator=gen, device=dev, dtype=torch.int8),
            "salient_scale": (torch.rand(n, generator=gen, device=dev) * 0.01 + 0.001).half(),
            "row_scales": ((torch.rand(n, generator=gen, device=dev) * 1.5 + 0.5).half() if row_multipliers
                           else torch.empty(0, device=dev, dtype=torch.float16)),
            "n": n, "k": k, "groups": groups}


def sage_launch_args(layer: dict, x: torch.Tensor, y: torch.Tensor):
    from sage_export.runtime import kernels

    return kernels.SageGemmArgs(
        x=x.data_ptr(), sign_bits=layer["sign_bits"].data_ptr(), group_codes=layer["group_codes"].data_ptr(),
        group_scales=layer["group_scales"].data_ptr(), salient_rowptr=layer["salient_rowptr"].data_ptr(),
        salient_cols=layer["salient_cols"].data_ptr(), salient_q=layer["salient_q"].data_ptr(),
        salient_scale=layer["salient_scale"].data_ptr(),
        row_scales=pointer_or_null(layer["row_scales"]), bias=0,
        y=y.data_ptr(), m=x.shape[0], nnz=layer["salient_cols"].shape[0], k=layer["k"], n=layer["n"],
        n_groups=layer["groups"], salient_bits=4, x_dtype=kernels.DTYPE_FLOAT16, bias_dtype=kernels.DTYPE_FLOAT16,
        path=kernels.PATH_AUTO, reserved=0)


def layer_bytes(layer: dict) -> int:
    return sum(t.numel() * t.element_size() for t in layer.values() if isinstance(t, torch.Tensor))


def linear_stack_rows(name: str, groups: int, fraction: float, tokens: int, row_multipliers: bool) -> list[dict]:
    """Tokens/s of the linear layers of one decode step (batch 1), float16 against SAGE, each from a CUDA graph."""
    from sage_export.runtime import kernels

    cfg = SHAPES[name]
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    block = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]  # (N, K) q k v o gate up down
    shapes = block * cfg["num_hidden_layers"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    x_h = torch.randn(1, h, device="cuda", dtype=torch.float16)
    x_i = torch.randn(1, inter, device="cuda", dtype=torch.float16)
    outs = {n: torch.empty(1, n, device="cuda", dtype=torch.float16) for n in {h, kv, inter}}
    lm_head = torch.randn(vocab, h, device="cuda", dtype=torch.float16) * 0.02
    logits = torch.empty(1, vocab, device="cuda", dtype=torch.float16)
    rows = []
    layout = f"sage G={groups}, {fraction:.1%} salient" + (", r_n" if row_multipliers else "")
    for variant in ("fp16", f"{layout}, gemv3", f"{layout}, gemv (no prepared layout)"):
        prepared: list[torch.Tensor] = []  # the GEMV3 layouts, alive while the graph runs
        if variant == "fp16":
            weights = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for n, k in shapes]
            calls = [lambda w=w, n=n, k=k: torch.mm(x_h if k == h else x_i, w.t(), out=outs[n])
                     for w, (n, k) in zip(weights, shapes)]
            quant_bytes = sum(w.numel() * 2 for w in weights)
            true_bits = 16.0
        else:
            weights = [random_packed_cuda(n, k, groups, fraction, gen, row_multipliers) for n, k in shapes]
            launches = [sage_launch_args(w, x_h if k == h else x_i, outs[n]) for w, (n, k) in zip(weights, shapes)]
            if "gemv3" in variant:
                prepared = [prepared_buffer(a, torch.device("cuda")) for a in launches]  # once per layer
                if any(b is None for b in prepared):  # the row would silently time another kernel
                    raise SystemExit(f"bench_decode: GEMV3 cannot take these layers (G = {groups})")
            else:
                for a in launches:
                    a.path = kernels.PATH_GEMV
            calls = [lambda a=a: kernels.launch(a, torch.cuda.current_stream().cuda_stream) for a in launches]
            quant_bytes = sum(layer_bytes(w) for w in weights)
            true_bits = 8 * quant_bytes / sum(n * k for n, k in shapes)
        calls.append(lambda: torch.mm(x_h, lm_head.t(), out=logits))
        step_us = graph_time_us(calls, tokens)
        nbytes = quant_bytes + lm_head.numel() * 2
        rows.append({"model": name, "variant": variant, "tokens_per_s": 1e6 / step_us, "step_us": step_us,
                     "bytes_per_token": nbytes, "gb_per_s": nbytes / step_us / 1e3,
                     "true_bits_linears": true_bits, "timing": "linear layers only, CUDA graph"})
        rows[-1]["speedup"] = rows[-1]["tokens_per_s"] / rows[0]["tokens_per_s"]
        print(rows[-1], flush=True)
        del weights, calls, prepared
        torch.cuda.empty_cache()
    return rows


def graph_time_us(calls: list, tokens: int) -> float:
    """Median time of one replay of a CUDA graph holding one decode step (all calls in order)."""
    import statistics

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:  # warm-up outside capture (library handles, lazy module loading)
            call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(tokens):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(samples)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {platform.machine()} (smoke run: not a speed result)"


def render_md(doc: dict) -> str:
    how = ("Linear layers of one decode step at batch 1 (q, k, v, o, gate, up, down per block, then lm_head in "
           "float16 for both), replayed from one CUDA graph: attention over the KV cache, norms and the embedding "
           "lookup are NOT included." if doc.get("mode") == "linear-stack" else
           "Greedy decode with KV cache after a prompt (Hugging Face model, eager).")
    out = ["# Decode speed, batch 1", "", f"{doc['device']}, {doc['date']}. Command: `{doc['command']}`", "",
           how + " GB/s = weight bytes read per token × tokens/s (KV cache not counted). SAGE rows use random "
           "packed weights of the model's shapes (speed does not depend on values).", "",
           "| model | variant | tokens/s | weight MB/token | GB/s | speedup |", "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        out.append(f"| {r['model']} | {r['variant']} | {r['tokens_per_s']:.1f} | {r['bytes_per_token'] / 1e6:.1f} | "
                   f"{r['gb_per_s']:.1f} | {r.get('speedup', 1.0):.2f}× |")
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", default=["llama7b"], choices=["llama7b", "smollm2", "tiny"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--salient-fraction", type=float, default=0.005)
    p.add_argument("--row-multipliers", action="store_true",
                   help="store a row multiplier r_n per row (the opt-in --row-multipliers layout; default: none)")
    p.add_argument("--hf", action="store_true", help="time the Hugging Face model (eager) instead of the linear stack")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "decode.json")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_decode: no CUDA device; use --device cpu for a smoke run", file=sys.stderr)
        return 2
    rows = []
    mode = "hf" if args.hf or args.device == "cpu" else "linear-stack"
    for name in args.model if mode == "hf" else []:
        base = None
        dense = "fp16" if args.device == "cuda" else "fp32"
        for variant in (dense, f"sage G={args.groups}" + (", r_n" if args.row_multipliers else "")):
            model = build_dense(name, args.device)
            if variant != dense:
                model = make_sage(model, args.groups, args.row_multipliers)
            tps = decode_tokens_per_s(model, args.device, args.prompt_len, args.tokens)
            nbytes = bytes_per_token(model)
            base = base or tps
            rows.append({"model": name, "variant": variant, "tokens_per_s": tps, "bytes_per_token": nbytes,
                         "gb_per_s": nbytes * tps / 1e9, "speedup": tps / base})
            print(rows[-1], flush=True)
            del model
    for name in args.model if mode == "linear-stack" else []:
        rows += linear_stack_rows(name, args.groups, args.salient_fraction, args.tokens, args.row_multipliers)
    doc = {"mode": mode, "device": device_name(args.device), "date": dt.date.today().isoformat(),
           "command": "python tools/bench_decode.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "prompt_len": args.prompt_len, "tokens": args.tokens, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render_md(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
