"""Orthrus against AR prompt by prompt, each pair read with where the host had put the two CPUs
(`core_handoff.c` before and after the pair: "near", a flag's round trip under 150 ns both times,
one core complex; "far", over it both times; else "mixed"), then tokens/s and the ratio per set
and placement, and where a cycle's time went: the verify (or AR) passes, the draft passes (with their
head) and the rest (the engine's Python, prefill left out), timed by wrapping the model's `forward`
and `draft`. On the project's 2-vCPU VMs the placement changes minute to minute and moves the AR
step far more than an Orthrus cycle (BENCHMARKS.md, "Two placements").

    python benchmarks/placement_ab.py --sets mtbench --rounds 3

The default model and drafter, 128 new tokens, the two methods in alternating order; greedy, or
sampled with `--temperature` (prompt i's seed 1 + i; the two methods then write different replies of
the same distribution, so each pair compares tokens/s, not times).
Pause background jobs first.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from engine_overhead import time_outermost
from machine_states import handoff_probe, placement

import orthrus
from orthrus.bench.prompts import load_prompt_set
from orthrus.engine import Engine

KINDS = {"forward": "ar", "draft": "draft", "_prefill": "prefill"}  # the calls timed, by what they are


def timed_passes(llm) -> dict[str, float]:
    """Seconds spent in each kind of call since the dict was last cleared: "ar" (the model's
    forward outside the others), "draft" (the draft pass and its head), "prefill"."""
    spent = collections.defaultdict(float)

    def record(name, args, seconds):
        spent[KINDS[name]] += seconds

    time_outermost(record, (type(llm.model), "forward"), (type(llm.model), "draft"), (Engine, "_prefill"))
    return spent


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="mtbench")
    ap.add_argument("--num-prompts", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    llm = orthrus.load(None)
    probe = handoff_probe()
    if probe is None:
        raise SystemExit("needs gcc and two CPUs to tell the placement")
    llm.generate("Hello", max_new_tokens=8)  # warm up (kernel packing, calibration)
    spent = timed_passes(llm)
    pairs = collections.defaultdict(list)  # (set, placement) -> (AR seconds, AR tokens, Orthrus seconds, tokens, cycles)
    parts = collections.defaultdict(lambda: collections.defaultdict(float))  # (placement, mode) -> seconds by part
    for name in args.sets.split(","):
        prompts = [llm.encode(p) for p in load_prompt_set(name, args.num_prompts).prompts]
        for r in range(args.rounds):
            for i, ids in enumerate(prompts):
                before, seconds, split, cycles, tokens = probe(), {}, {}, {}, {}
                for mode in ("ar", "orthrus") if (r + i) % 2 else ("orthrus", "ar"):
                    spent.clear()
                    start = time.perf_counter()
                    out = llm.generate(ids, max_new_tokens=args.max_new_tokens, mode=mode, temperature=args.temperature,
                                       seed=1 + i)
                    seconds[mode] = time.perf_counter() - start
                    split[mode], cycles[mode], tokens[mode] = dict(spent), out.stats.cycles, len(out.token_ids)
                after = probe()
                where = placement(before, after)
                pairs[name, where].append((seconds["ar"], tokens["ar"], seconds["orthrus"], tokens["orthrus"], cycles["orthrus"]))
                for mode in seconds:
                    part = parts[where, mode]
                    part["cycles"] += cycles[mode]
                    part["engine"] += seconds[mode] - sum(split[mode].values())
                    for kind in ("ar", "draft"):
                        part[kind] += split[mode].get(kind, 0.0)
                speed = {mode: tokens[mode] / seconds[mode] for mode in seconds}
                print(f"{name} round {r} prompt {i}: handoff {before:.0f} / {after:.0f} ns, AR {speed['ar']:.1f} tok/s, "
                      f"Orthrus {speed['orthrus']:.1f} tok/s, {speed['orthrus'] / speed['ar']:.2f}x", flush=True)
    print("| set | placement | pairs | AR tok/s | Orthrus tok/s | Orthrus / AR | tokens a cycle |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (name, where), runs in sorted(pairs.items()):
        ar, ar_tokens, orthrus_s, orthrus_tokens, cycles = (sum(column) for column in zip(*runs))
        ar_speed, orthrus_speed = ar_tokens / ar, orthrus_tokens / orthrus_s
        print(f"| {name} | {where} | {len(runs)} | {ar_speed:.1f} | {orthrus_speed:.1f} | {orthrus_speed / ar_speed:.2f}x | "
              f"{orthrus_tokens / cycles:.2f} |")
    print("\nms a cycle (AR: a step), every set: | placement | AR step: pass + engine | Orthrus: verify | draft pass | engine |")
    for where in ("far", "near", "mixed"):
        ar, orth = parts.get((where, "ar")), parts.get((where, "orthrus"))
        if ar and orth:
            per = lambda part, kind: part[kind] / part["cycles"] * 1e3  # noqa: E731
            print(f"| {where} | {per(ar, 'ar'):.2f} + {per(ar, 'engine'):.2f} | {per(orth, 'ar'):.2f} | "
                  f"{per(orth, 'draft'):.2f} | {per(orth, 'engine'):.2f} |")


if __name__ == "__main__":
    main()
