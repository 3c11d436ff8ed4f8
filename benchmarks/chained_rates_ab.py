"""The planner's estimate for lookup drafts and lookup extensions, before and after commit 5c781d1,
side by side, each pass at its calibrated cost (`generate_ab.modeled_passes`: no timing noise, so
background jobs may run): "pooled" counts every lookup (or extension) draft at one rate, accepted over
offered in the row's recent cycles, so n drafts add a + a^2 + ... + a^n tokens; "chained" (the engine's
`SequenceStats.lookup_rates` / `extension_rates`) gives each position its own rate once the drafts
before it are accepted. Prints tokens a cycle, tokens per modeled second and cycles by source.

    python benchmarks/chained_rates_ab.py [--temperature 0.7 --seeds 3]
"""

from __future__ import annotations

import argparse

import torch

import orthrus
from orthrus.bench.prompts import load_prompt_set
from orthrus.engine import SequenceStats

from generate_ab import modeled_passes


def pooled_lookup_rates(self, positions: int, window: int = 16) -> list[float]:
    recent = [(a, d) for a, d, s in zip(reversed(self.accepted), reversed(self.drafted), reversed(self.sources))
              if s == "lookup"][:window]
    return [(sum(a for a, _ in recent) + 1) / (sum(d for _, d in recent) + 2)] * positions


def pooled_extension_rates(self, positions: int, window: int = 16) -> list[float]:
    hits = tries = seen = 0
    for a, d, e, leaf in zip(reversed(self.accepted), reversed(self.drafted), reversed(self.extended), reversed(self.branches)):
        if e and a >= d - e and not leaf:
            hits, tries, seen = hits + a - (d - e), tries + min(e, a - (d - e) + 1), seen + 1
            if seen == window:
                break
    return [(hits + 1) / (tries + 2)] * positions


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="mtbench,humaneval,gsm,benchmarks/prompts/docs.jsonl")
    ap.add_argument("--num-prompts", type=int, default=10)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seeds", type=int, default=1, help="sampling runs a prompt (seed 1000 * run + the prompt's index)")
    ap.add_argument("--threads", type=int, default=1, help="whose calibrated pass costs are used")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    chained = SequenceStats.lookup_rates, SequenceStats.extension_rates
    llm = orthrus.load(None)
    llm.generate("Hello", max_new_tokens=8)  # packs the weights, calibrates the planner
    print("| set | tokens a cycle, pooled | chained | tokens per modeled s, pooled | chained | ratio | cycles by source, pooled | chained |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    try:
        for spec in args.sets.split(","):
            prompts = load_prompt_set(spec, args.num_prompts).prompts
            result = []
            for rates in ((pooled_lookup_rates, pooled_extension_rates), chained):
                SequenceStats.lookup_rates, SequenceStats.extension_rates = rates
                tokens = cycles = 0
                seconds, sources = 0.0, {}
                for run in range(args.seeds if args.temperature > 0 else 1):
                    for i, prompt in enumerate(prompts):
                        with modeled_passes(llm) as spent:
                            out = llm.generate(prompt, max_new_tokens=128, temperature=args.temperature, seed=1000 * run + i)
                        seconds, tokens, cycles = seconds + sum(spent), tokens + len(out.token_ids), cycles + out.stats.cycles
                        for source in out.stats.sources:
                            sources[source] = sources.get(source, 0) + 1
                result.append((tokens / cycles, tokens / seconds, sources))
            (c0, r0, s0), (c1, r1, s1) = result
            print(f"| {spec} | {c0:.3f} | {c1:.3f} | {r0:.1f} | {r1:.1f} | {r1 / r0:.3f}x | {s0} | {s1} |", flush=True)
    finally:
        SequenceStats.lookup_rates, SequenceStats.extension_rates = chained


if __name__ == "__main__":
    main()
