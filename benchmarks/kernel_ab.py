"""Two builds of the CPU kernels side by side in one process, alternating pass by pass (so machine
noise hits both alike): the way to time a kernel change on a shared machine.

Build each source into its own cache (a build of one source deletes other builds of its instruction
set from the cache folder, so copy the .so files somewhere else first), then:

    git worktree add /tmp/old HEAD~1
    (cd /tmp/old && ORTHRUS_CACHE=/tmp/old-cache PYTHONPATH=/tmp/old python -c "from orthrus import kernels; kernels.module()")
    python benchmarks/kernel_ab.py /tmp/old-cache/kernels/orthrus_cpu_*.so ~/.cache/orthrus/kernels/orthrus_cpu_*.so \\
        --view diffusion --tokens 4 --draft-dtype int8

The two builds must share the Python interface of this checkout (the decoder stack, `linear`).

The build loaded second measures 5-10% slower even when both are the same source and flags (seen
2026-11-26 on a Zen 4: B / A 1.05-1.10 for two builds of one file, in either order; the cause is not
known), so the script runs twice, A then B and B then A, each in its own process, and reports the
geometric mean of the two ratios, which cancels that bias.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from cpu_hot_path import pass_timer

import orthrus
from orthrus import kernels


def load_build(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).name.split(".")[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="the first build (.so)")
    ap.add_argument("b", help="the second build (.so)")
    ap.add_argument("--view", choices=["ar", "diffusion"], default="ar")
    ap.add_argument("--tokens", type=int, default=4, help="tokens per pass (up to 64)")
    ap.add_argument("--context", type=int, default=256, help="cached tokens before each pass")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--draft-dtype", default="int8", help="auto | int8 | model (for --view diffusion)")
    ap.add_argument("--passes", type=int, default=60, help="passes per build")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    builds = {"A": load_build(args.a), "B": load_build(args.b)}
    kernels.module()
    llm = orthrus.load(None, dtype=args.dtype, device="cpu", draft_dtype=args.draft_dtype)
    one_pass = pass_timer(llm.model, args.context, args.view)

    times = {"A": [], "B": []}
    for i in range(args.passes + 1):  # the first round warms both up (packing, the stacks) and is dropped
        for name in ("A", "B") if i % 2 else ("B", "A"):
            kernels._module = builds[name]
            took = one_pass(args.tokens) * 1e3
            if i:
                times[name].append(took)
    a, b = statistics.median(times["A"]), statistics.median(times["B"])
    print(json.dumps({"a": a, "b": b}))


def both_orders(argv: list[str]) -> None:
    """Run the comparison with the builds loaded in both orders and cancel the order's bias."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    args, rest = ap.parse_known_args(argv)
    runs = []
    for first, second in ((args.a, args.b), (args.b, args.a)):
        out = subprocess.run([sys.executable, __file__, "--one-order", first, second, *rest], check=True,
                             capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    b_over_a = (runs[0]["b"] / runs[0]["a"]) / (runs[1]["b"] / runs[1]["a"])  # bias x r over bias / r = r^2
    print(f"{' '.join(rest) or 'defaults'}: A then B: A {runs[0]['a']:.2f} ms, B {runs[0]['b']:.2f} ms; "
          f"B then A: B {runs[1]['a']:.2f} ms, A {runs[1]['b']:.2f} ms; B / A {math.sqrt(b_over_a):.3f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one-order"]:
        main(sys.argv[2:])
    else:
        both_orders(sys.argv[1:])
