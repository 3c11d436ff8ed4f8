"""Where the time of one pass over the KV cache goes: the decoder stack phase by phase (the
products, attention, the small per-token ops between them), the final norm and head, and what runs
in Python before them (the cache window, embeddings, rotary tables).

Builds the CPU kernels with `-DORTHRUS_PHASES` (timers between the stack's phases; the normal
build has none) into a temp folder, then times passes of the default model:

    python benchmarks/pass_phases.py --dtype bfloat16 --draft-dtype int8 --threads 2

Pause background jobs first; phases are medians over the passes, in ms.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from cpu_hot_path import prefilled_cache
from torch.utils.cpp_extension import load

import orthrus
from orthrus import kernels

PHASES = ("small ops", "qkv", "attention", "o", "gate/up", "down")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--draft-dtype", default="int8", help="auto | int8 | model")
    ap.add_argument("--context", type=int, default=256, help="cached tokens before each pass")
    ap.add_argument("--passes", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default="ar:1,ar:5,diffusion:4,ar:8,ar:16", help="view:tokens of the passes to time")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    if kernels.module() is None:
        raise SystemExit("the CPU kernels are off on this machine: nothing to profile")
    with tempfile.TemporaryDirectory() as build:
        kernels._module = load(name=f"orthrus_phases_{kernels.build_id()}", sources=[str(kernels.SOURCE)],
                               extra_cflags=[*kernels.compile_flags(), "-DORTHRUS_PHASES"], extra_ldflags=["-fopenmp"],
                               build_directory=build)
    llm = orthrus.load(None, dtype=args.dtype, device="cpu", draft_dtype=args.draft_dtype)
    model = llm.model
    cache, rows = prefilled_cache(model, args.context)

    print(f"{args.dtype} model, {args.draft_dtype} drafts, {args.threads} threads, {args.context} cached tokens; ms per pass")
    print(f"| pass | total | Python before the stack | {' | '.join(PHASES)} | norm + head |")
    print("|---|" + "---:|" * (3 + len(PHASES)))
    for shape in args.shapes.split(","):
        view, tokens = shape.split(":")
        parts: dict[str, list[float]] = {name: [] for name in ("total", "python", *PHASES, "head")}
        for i in range(args.passes + 2):  # the first two warm up
            ids = torch.randint(0, 1000, (1, int(tokens)))
            with torch.inference_mode():
                start = time.perf_counter()
                window = cache.window(rows, int(tokens), bidirectional=view == "diffusion")
                x, (cos, sin) = model.embed(ids).contiguous(), model.rotary(window.positions)
                stack_start = time.perf_counter()
                x = kernels.decoder_stack(model).forward(x, cos, sin, *window.kernel_cache, view == "diffusion")
                head_start = time.perf_counter()
                x = kernels.rmsnorm(x, model.model.norm.weight, model.model.norm.eps)
                kernels.linear(x, model.lm_head, int8=model.int8_drafts and view == "diffusion", float_out=True)
                end = time.perf_counter()
            phases = kernels._module.take_phases()
            if i >= 2:
                parts["total"].append((end - start) * 1e3)
                parts["python"].append((stack_start - start) * 1e3)
                parts["head"].append((end - head_start) * 1e3)
                for name, ms in zip(PHASES, phases):
                    parts[name].append(ms)
        print(f"| {view} {tokens} | " + " | ".join(f"{statistics.median(v):.2f}" for v in parts.values()) + " |")


if __name__ == "__main__":
    main()
