#!/usr/bin/env python3
"""Decode speed at batch 1: float16 Hugging Face model vs the same model with SageLinear kernels.

Reports tokens/s and achieved GB/s of weight bytes read per token (every quantized layer in its stored form plus
the float16 tensors a decode step reads: norms and lm_head; the KV cache is left out, and said so). Weights of the
SAGE variant are random packed layers of the model's shapes: decode speed does not depend on their values.
Results go to benchmarks/decode.json + decode.md with device, date and command.

    python tools/bench_decode.py --model llama7b smollm2           # on a GPU
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
from sage_export.runtime.sage_linear import replace_linears  # noqa: E402
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


def make_sage(model, n_groups: int):
    linears = quantizable_linears(model, LLAMA)
    packed = {n: random_packed_linear(l.out_features, l.in_features, n_groups, seed=i)
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


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {platform.machine()} (smoke run: not a speed result)"


def render_md(doc: dict) -> str:
    out = ["# Decode speed, batch 1", "", f"{doc['device']}, {doc['date']}. Command: `{doc['command']}`", "",
           "Greedy decode with KV cache after a prompt; GB/s = weight bytes read per token × tokens/s (KV cache "
           "not counted). SAGE rows use random packed weights of the model's shapes (speed does not depend on "
           "values).", "",
           "| model | variant | tokens/s | weight MB/token | GB/s | speedup |", "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        out.append(f"| {r['model']} | {r['variant']} | {r['tokens_per_s']:.1f} | {r['bytes_per_token'] / 1e6:.1f} | "
                   f"{r['gb_per_s']:.1f} | {r.get('speedup', 1.0):.2f}× |")
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", default=["llama7b", "smollm2"], choices=["llama7b", "smollm2", "tiny"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "decode.json")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_decode: no CUDA device; use --device cpu for a smoke run", file=sys.stderr)
        return 2
    rows = []
    for name in args.model:
        base = None
        dense = "fp16" if args.device == "cuda" else "fp32"
        for variant in (dense, f"sage G={args.groups}"):
            model = build_dense(name, args.device)
            if variant != dense:
                model = make_sage(model, args.groups)
            tps = decode_tokens_per_s(model, args.device, args.prompt_len, args.tokens)
            nbytes = bytes_per_token(model)
            base = base or tps
            rows.append({"model": name, "variant": variant, "tokens_per_s": tps, "bytes_per_token": nbytes,
                         "gb_per_s": nbytes * tps / 1e9, "speedup": tps / base})
            print(rows[-1], flush=True)
            del model
    doc = {"device": device_name(args.device), "date": dt.date.today().isoformat(),
           "command": "python tools/bench_decode.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "prompt_len": args.prompt_len, "tokens": args.tokens, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render_md(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
