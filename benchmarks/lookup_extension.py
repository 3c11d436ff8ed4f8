"""The lookup extension after the block draft (`engine.plan_tree`), measured two ways on the default
model and drafter, greedy unless told otherwise, 10 prompts a set x 128 new tokens:

- `--replay`: its potential. Decodes each prompt with the extension off and, in every drafter cycle
  that accepted its whole block draft, checks what a prompt lookup keyed on the drafts' last tokens
  would have added had up to M extension rows been free: tokens per drafter cycle, M = 1..4.
- otherwise, side by side: Orthrus with the extension off (MAX_EXTENSION = 0) and on, and AR mode,
  each prompt under each in turn for two rounds, the fastest kept; speed over AR and tokens a cycle.

    python benchmarks/lookup_extension.py --sets mtbench,humaneval,gsm,benchmarks/prompts/docs.jsonl [--replay]

Pause background jobs first.
"""

from __future__ import annotations

import argparse
import time

import torch

import orthrus
from orthrus import engine
from orthrus.bench.prompts import load_prompt_set
from orthrus.engine import PromptLookup


def replay(llm, prompts, most: int = 4) -> str:
    cycles, gained = 0, [0] * (most + 1)
    engine.MAX_EXTENSION = 0
    for prompt in prompts:
        out = llm.generate(prompt, max_new_tokens=128)
        text, made, start = llm.encode(prompt), out.token_ids, 0
        for accepted, source, leaf in zip(out.stats.accepted, out.stats.sources, out.stats.branches):
            if source == "diffusion":
                cycles += 1
                if accepted == 3 and not leaf:  # the whole block draft (3 drafts) accepted
                    committed = text + made[:start]
                    found = PromptLookup().drafts(committed, most, made[start : start + 3])
                    ahead = made[start + 3 : start + 3 + most]  # what decoding went on to emit
                    right = next((j for j, (a, b) in enumerate(zip(found, ahead)) if a != b), min(len(found), len(ahead)))
                    for m in range(1, most + 1):
                        gained[m] += min(right, m)
            start += accepted + 1
    return ", ".join(f"M={m} +{gained[m] / cycles:.3f}" for m in range(1, most + 1)) + f" tokens a drafter cycle ({cycles} cycles)"


def side_by_side(llm, prompts, temperature: float) -> str:
    variants = {"off": ("orthrus", 0), "on": ("orthrus", 4), "ar": ("ar", 0)}
    fastest, tokens, cycles = ({v: 0.0 for v in variants} for _ in range(3))
    for i, prompt in enumerate(prompts):
        best = dict.fromkeys(variants, float("inf"))
        for round_ in range(2):
            for name, (mode, extension) in variants.items():
                engine.MAX_EXTENSION = extension
                start = time.perf_counter()
                out = llm.generate(prompt, max_new_tokens=128, mode=mode, temperature=temperature, seed=i)
                best[name] = min(best[name], time.perf_counter() - start)
                if round_ == 0:
                    tokens[name] += len(out.token_ids)
                    cycles[name] += out.stats.cycles
        for name in variants:
            fastest[name] += best[name]
    return ", ".join(f"{name} {fastest['ar'] / fastest[name]:.3f}x AR ({tokens[name] / cycles[name]:.2f} tokens a cycle)"
                     for name in variants)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="mtbench,humaneval,gsm")
    ap.add_argument("--num-prompts", type=int, default=10)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--replay", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    llm = orthrus.load(None)
    llm.generate("Hello", max_new_tokens=8)  # builds, packs and calibrates outside the timings
    for spec in args.sets.split(","):
        prompts = load_prompt_set(spec, args.num_prompts)
        result = replay(llm, prompts.prompts) if args.replay else side_by_side(llm, prompts.prompts, args.temperature)
        print(f"{prompts.name}: {result}", flush=True)


if __name__ == "__main__":
    main()
