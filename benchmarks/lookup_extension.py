"""The lookup extension after the block draft (`engine.plan_tree`): its potential. Decodes each
prompt of each set (default model and drafter, greedy, 10 prompts x 128 new tokens) with the extension
off and, in every drafter cycle that accepted its whole block draft (3 drafts), checks what a prompt
lookup keyed on the drafts' last tokens would have added had up to M extension rows been free:
tokens per drafter cycle, M = 1..4.

    python benchmarks/lookup_extension.py --sets mtbench,humaneval,gsm,benchmarks/prompts/docs.jsonl

Its speed, off against on, side by side: `benchmarks/generate_ab.py --variant off engine.MAX_EXTENSION=0
--variant on engine.MAX_EXTENSION=4 --variant ar mode=ar`.
"""

from __future__ import annotations

import argparse

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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="mtbench,humaneval,gsm")
    ap.add_argument("--num-prompts", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    llm = orthrus.load(None)
    llm.generate("Hello", max_new_tokens=8)  # builds, packs and calibrates first
    for spec in args.sets.split(","):
        prompts = load_prompt_set(spec, args.num_prompts)
        print(f"{prompts.name}: {replay(llm, prompts.prompts)}", flush=True)


if __name__ == "__main__":
    main()
