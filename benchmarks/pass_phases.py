"""Where the time of one pass over the KV cache goes: the decoder stack phase by phase (the
products, attention, the small per-token ops between them), the final norm and head, and what runs
in Python before them (the cache window, embeddings, rotary tables).

Builds the CPU kernels with `-DORTHRUS_PHASES` (timers between the stack's phases; the normal
build has none) into a temp folder, then times passes of the default model:

    python benchmarks/pass_phases.py --dtype bfloat16 --draft-dtype int8 --threads 2

`--rounds R` times every shape R times over, reading where the host placed the two vCPUs before and
after each round (`machine_states.placement`: "near", one core complex, or "far", two; rounds that
straddle a change are left out), and prints a table per placement: which phases pay for the far
one's slower handoffs.

Pause background jobs first; phases are medians over the passes, in ms.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from cpu_hot_path import prefilled_cache
from machine_states import handoff_probe, placement
from torch.utils.cpp_extension import load

import orthrus
from orthrus import kernels

PHASES = ("small ops", "qkv", "attention", "o", "gate/up", "down")
PARTS = ("total", "python", *PHASES, "head")  # a pass's time, and its phases


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--draft-dtype", default="int8", help="auto | int8 | model")
    ap.add_argument("--context", type=int, default=256, help="cached tokens before each pass")
    ap.add_argument("--passes", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default="ar:1,ar:5,diffusion:4,ar:8,ar:16", help="view:tokens of the passes to time")
    ap.add_argument("--rounds", type=int, default=0, help="rounds of every shape, split by the vCPUs' placement (0: one table)")
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

    shapes = [(view, int(tokens)) for view, tokens in (shape.split(":") for shape in args.shapes.split(","))]
    probe = handoff_probe() if args.rounds else None
    placements: dict[str, dict] = {}  # placement -> (view, tokens) -> phase -> ms of each pass
    for _ in range(max(1, args.rounds)):
        before = probe() if probe else 0.0
        took = {shape: time_passes(model, cache, rows, *shape, args.passes) for shape in shapes}
        where = placement(before, probe()) if probe else "all"
        if where == "mixed":
            continue
        for shape, parts in took.items():
            for name in PARTS:
                placements.setdefault(where, {}).setdefault(shape, {}).setdefault(name, []).extend(parts[name])
    print(f"{args.dtype} model, {args.draft_dtype} drafts, {args.threads} threads, {args.context} cached tokens; ms per pass")
    for where, by_shape in placements.items():
        if probe:
            print(f"\n{where} ({len(by_shape[shapes[0]]['total']) // args.passes} rounds)")
        print(f"| pass | total | Python before the stack | {' | '.join(PHASES)} | norm + head |")
        print("|---|" + "---:|" * (3 + len(PHASES)))
        for (view, tokens), parts in by_shape.items():
            print(f"| {view} {tokens} | " + " | ".join(f"{statistics.median(parts[name]):.2f}" for name in PARTS) + " |")


def time_passes(model, cache, rows, view: str, tokens: int, passes: int) -> dict[str, list[float]]:
    """ms of each phase of `passes` passes of one shape (after two that warm up)."""
    parts: dict[str, list[float]] = {name: [] for name in PARTS}
    for i in range(passes + 2):
        ids = torch.randint(0, 1000, (1, tokens))
        with torch.inference_mode():
            start = time.perf_counter()
            window = cache.window(rows, tokens, bidirectional=view == "diffusion")
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
    return parts

if __name__ == "__main__":
    main()
