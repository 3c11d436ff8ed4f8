"""Replay the planner's drafter-or-AR-step choice on recorded drafter cycles (issue 10).

Decodes each prompt with the drafter every cycle (tree leaves on, no lookup, no AR steps),
records the drafts accepted per cycle, then replays `plan_cycle` (sources diffusion and ar) over
that record with this machine's pass costs: where it picks an AR step the row gains 1 token for a
1-token pass, where it drafts it gains the recorded cycle's tokens for a draft + verify pass. It
prints the replayed tokens per second against drafting every cycle, and how well the planner's
estimate (`SequenceStats.recent_accepted`) predicts the next cycle: the drafts the next cycle
accepted, by range of the estimate. Edit the estimator in engine.py and rerun to compare.

    python benchmarks/planner_replay.py --sets mtbench --num-prompts 10 [--cycle-ms 1.8 --step-ms 0.7]

(ORTHRUS_ISA=avx2 for the AVX2 build's costs.) `--cycle-ms` / `--step-ms`: the engine's own time
per drafter cycle and per AR step (`benchmarks/engine_overhead.py`), added to the pass costs.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import orthrus
from orthrus.bench.prompts import load_prompt_set
from orthrus.engine import Sequence, SequenceStats, plan_cycle


def replay(prompt: list[int], accepted: list[int], costs, block: int, cycle_s: float, step_s: float,
           sources=("diffusion", "ar")):
    """(tokens, seconds, AR steps, [(estimate, drafts the next cycle accepted)]) of the planner over
    one record, choosing among `sources` (("diffusion",): the drafter every cycle)."""
    seq, tokens, seconds, steps, predictions = Sequence(list(prompt)), 0, 0.0, 0, []
    for real in accepted:
        estimate = seq.stats.recent_accepted("diffusion")
        predictions.append((estimate, real))
        context = seq.context
        if plan_cycle([seq], block, costs, sources, [0])[0].source == "diffusion":
            gained, seconds = 1 + real, seconds + costs.draft_pass(context) + costs.verify_pass(block, context) + cycle_s
            seq.stats.accepted.append(real), seq.stats.sources.append("diffusion"), seq.stats.drafted.append(block - 1)
        else:
            gained, seconds, steps = 1, seconds + costs.verify_pass(1, context) + step_s, steps + 1
            seq.stats.accepted.append(0), seq.stats.sources.append("ar"), seq.stats.drafted.append(0)
        seq.stats.branches.append(0)
        seq.generated += [0] * gained  # the context grows as decoding would have grown it
        tokens += gained
    return tokens, seconds, steps, predictions


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="mtbench")
    ap.add_argument("--num-prompts", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--cycle-ms", type=float, default=1.8)
    ap.add_argument("--step-ms", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    llm = orthrus.load(None)
    block, costs = llm.block_size, llm.pass_costs()
    for spec in args.sets.split(","):
        planned, always, steps, predictions = [0, 0.0], [0, 0.0], 0, []
        for prompt in load_prompt_set(spec, args.num_prompts).prompts:
            ids = llm.encode(prompt)
            accepted = list(llm.generate(ids, max_new_tokens=args.max_new_tokens, sources=("diffusion", "tree")).stats.accepted)
            overheads = args.cycle_ms / 1e3, args.step_ms / 1e3
            tokens, seconds, ar, seen = replay(ids, accepted, costs, block, *overheads)
            planned = [planned[0] + tokens, planned[1] + seconds]
            steps, predictions = steps + ar, predictions + seen
            tokens, seconds, _, _ = replay(ids, accepted, costs, block, *overheads, sources=("diffusion",))
            always = [always[0] + tokens, always[1] + seconds]
        print(f"{spec}: planner {planned[0] / planned[1]:.1f} tok/s ({steps} AR steps), drafting every cycle "
              f"{always[0] / always[1]:.1f} tok/s (replayed at the pass costs)")
        for low, high in ((0, 0.8), (0.8, 1.2), (1.2, 1.6), (1.6, 99)):
            got = [real for estimate, real in predictions if low <= estimate < high]
            if got:
                mean = statistics.mean(e for e, _ in predictions if low <= e < high)
                print(f"  estimate in [{low}, {high}): {len(got)} cycles, mean estimate {mean:.2f}, "
                      f"the next cycle accepted {statistics.mean(got):.2f}")


if __name__ == "__main__":
    main()
