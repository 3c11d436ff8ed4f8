"""Whether this machine's pass costs hold still: rounds of an AR step, 4-, 8- and 16-token AR passes and
the draft pass, back to back after 128 cached tokens, for a while; per window of seconds, each
pass's cost in AR steps (the median of each round's own ratio, so a slow spell hits both sides of
it), the step's fastest time, and how far apart the two CPUs are (`core_handoff.c`: the median
round trip of a flag between threads pinned to the first two CPUs, ~50 ns on one core complex,
~400 ns across two; built with gcc, left out where there is none or fewer than two CPUs).

    python benchmarks/machine_states.py --seconds 72 --window 6

A machine whose ratios move from window to window (seen on a shared Zen 4 VM: a 4 / 8-token pass
1.13 / 1.25 steps for half a minute, then 1.27 / 1.57) changes what the planner should pick, and
the Orthrus/AR ratio of any run, by that much. Pause background jobs first.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import orthrus
from orthrus import kernels
from orthrus.cache import KVCache
from orthrus.engine import prefill, time_pass

SHAPES = (("ar", 1), ("ar", 4), ("ar", 8), ("ar", 16), ("diffusion", 4))
HANDOFF_TRIPS = 2000  # round trips per reading: ~0.1-1 ms
NEAR_NS = 150  # round trips below this: both CPUs on one core complex


def placement(before: float, after: float) -> str:
    """Where the host had the two CPUs over a stretch of work, from handoff readings before and after
    it: "near" (one core complex both times), "far" (two both times) or "mixed"."""
    return "far" if min(before, after) >= NEAR_NS else "near" if max(before, after) < NEAR_NS else "mixed"


def handoff_probe():
    """ns of a flag's round trip between the first two CPUs this process may use (`core_handoff.c`),
    as a function of no arguments, or None without gcc or a second CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or shutil.which("gcc") is None:
        return None
    library = Path(tempfile.mkdtemp()) / "core_handoff.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-pthread", str(Path(__file__).with_name("core_handoff.c")),
                    "-o", str(library)], check=True)
    probe = ctypes.CDLL(str(library)).handoff_ns
    probe.restype, probe.argtypes = ctypes.c_double, (ctypes.c_long, ctypes.c_int, ctypes.c_int)
    return lambda: probe(HANDOFF_TRIPS, cpus[0], cpus[1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=72.0)
    ap.add_argument("--window", type=float, default=6.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = orthrus.load(None).model
    kernels.prepare(model)  # packs the weights, outside inference mode
    cache = KVCache(model.config, 1, 256, next(model.parameters()).dtype, "cpu")
    handoff = handoff_probe()
    rounds, began = [], time.perf_counter()
    with torch.inference_mode():
        prefill(model, cache, torch.tensor([0]), [[0] * 128])
        while time.perf_counter() - began < args.seconds:
            took = {(view, tokens): time_pass(model, cache, 0, view, tokens) for view, tokens in SHAPES}
            if handoff:
                took["handoff"] = handoff()
            rounds.append((time.perf_counter() - began, took))
    print("| seconds | rounds | AR step, fastest (ms) | " + " | ".join(f"{v} {t}, steps" for v, t in SHAPES[1:])
          + " | CPU handoff (ns) |" * bool(handoff))
    print("|---|---:|---:|" + "---:|" * (len(SHAPES) - 1) + "---:|" * bool(handoff))
    for w in range(int(args.seconds // args.window)):
        inside = [took for at, took in rounds if w * args.window <= at < (w + 1) * args.window]
        if not inside:
            continue
        step = min(took["ar", 1] for took in inside)
        ratios = [statistics.median(took[shape] / took["ar", 1] for took in inside) for shape in SHAPES[1:]]
        handoffs = f" {statistics.median(took['handoff'] for took in inside):.0f} |" if handoff else ""
        print(f"| {w * args.window:.0f}-{(w + 1) * args.window:.0f} | {len(inside)} | {step * 1e3:.2f} | "
              + " | ".join(f"{r:.2f}" for r in ratios) + " |" + handoffs)


if __name__ == "__main__":
    main()
