"""Options of `generate` side by side in one process: each prompt of each set runs under every
variant in turn, for a few rounds, and the fastest run of each (prompt, variant) is kept, so a slow
spell of the machine hits every variant alike. Prints tokens/s against the first variant and tokens
per cycle (AR steps count as cycles of one token).

    python benchmarks/generate_ab.py --sets mtbench,gsm,humaneval --rounds 2 \\
        --variant b4 block_size=4 --variant b5 block_size=5 --variant no-tree sources=diffusion,lookup,ar \\
        --variant ar mode=ar

A variant is a name and `key=value` options of `generate` (a comma makes a tuple of strings; an
integer or a float is parsed as one), or `engine.NAME=value`: a planner constant of `orthrus.engine`
set for that variant's runs (`--variant off engine.MAX_EXTENSION=0`; variants without it run at the
module's own value), or `drafter=FOLDER`: that variant decodes with another drafter (`--variant new
drafter=/tmp/export block_size=5`; without it, the shipped one; each drafter's model is loaded once,
and the same two drafters measured 1.03-1.06x for whichever was loaded second in one run and about
even in the other order, 2026-11-28: run both orders). `--paired` also prints, per prompt, every variant's time from
the one round in which the last variant ran fastest, beside each variant's own fastest: on a machine
whose memory bus is sometimes shared (BENCHMARKS.md, "Two machine states"), with AR as the last
variant this gives the ratios of the uncontended state, where the variants of a round ran within
seconds of each other. Pause background jobs first.

`--modeled`: each decoding pass costs what the planner's calibration says it costs (the machine's
cached pass costs, `Orthrus.pass_costs`; prefill not counted), not its wall time: planner variants
compare without timing noise, and background jobs need not be paused (one round is enough for greedy
variants, whose tokens repeat).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

import orthrus
from orthrus import engine
from orthrus.bench.prompts import load_prompt_set
from orthrus.model import OrthrusLM


@contextlib.contextmanager
def modeled_passes(llm, block_size: int | None = None):
    """Within it, each verify pass (or AR step) and draft pass of `llm` appends its calibrated cost in
    seconds (`llm.pass_costs` of `block_size`, default the drafter's: the block decoded within, whose
    calibration knows its draft pass and its widest verify; at the pass's context) to the list it
    yields; prefill passes add nothing."""
    costs, spent = llm.pass_costs(block_size), []
    forward, draft = OrthrusLM.forward, OrthrusLM.draft

    def costed_forward(self, tokens, positions, kv, view="ar", logits=True):
        if logits and view == "ar" and tokens.shape[1] <= 16:  # a verify pass (or an AR step), not a prefill
            spent.append(costs.verify_pass(tokens.shape[1], int(positions[0, 0])))
        return forward(self, tokens, positions, kv, view, logits)

    def costed_draft(self, tokens, positions, kv):
        spent.append(costs.draft_pass(int(positions[0, 0])))
        return draft(self, tokens, positions, kv)

    OrthrusLM.forward, OrthrusLM.draft = costed_forward, costed_draft
    try:
        yield spent
    finally:
        OrthrusLM.forward, OrthrusLM.draft = forward, draft


def option(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, tuple(value.split(",")) if "," in value else value


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="mtbench,gsm,humaneval")
    ap.add_argument("--num-prompts", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", nargs="+", action="append", required=True, metavar=("NAME", "KEY=VALUE"))
    ap.add_argument("--paired", action="store_true", help="times from the round where the last variant was fastest")
    ap.add_argument("--modeled", action="store_true", help="passes timed at their calibrated costs, not by the clock")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = {name: dict(map(option, options)) for name, *options in args.variant}
    constants = {key: getattr(engine, key.removeprefix("engine.")) for options in variants.values() for key in options
                 if key.startswith("engine.")}  # each at its own value, for the variants that do not set it
    models = {}  # per drafter folder (None: the shipped one), loaded once
    for options in variants.values():
        if options.get("drafter") not in models:
            models[options.get("drafter")] = llm = orthrus.load(None, drafter=options.get("drafter"))
            llm.generate("Hello", max_new_tokens=8)  # packs the weights, calibrates the planner
    for spec in args.sets.split(","):
        prompts = load_prompt_set(spec, args.num_prompts).prompts
        took = {name: [[] for _ in prompts] for name in variants}  # seconds, per prompt, per round
        tokens = {name: [0] * len(prompts) for name in variants}
        cycles = {name: [0] * len(prompts) for name in variants}
        for _ in range(args.rounds):
            for i, prompt in enumerate(prompts):
                for name, options in variants.items():
                    for key, default in constants.items():
                        setattr(engine, key.removeprefix("engine."), options.get(key, default))
                    generate = {key: value for key, value in options.items() if key not in constants and key != "drafter"}
                    llm = models[options.get("drafter")]
                    timing = modeled_passes(llm, generate.get("block_size")) if args.modeled else contextlib.nullcontext()
                    with timing as spent:
                        start = time.perf_counter()
                        out = llm.generate(prompt, max_new_tokens=args.max_new_tokens, **generate)
                        took[name][i].append(sum(spent) if args.modeled else time.perf_counter() - start)
                    tokens[name][i], cycles[name][i] = len(out.token_ids), out.stats.cycles
        kept = {"fastest": {name: [min(times) for times in took[name]] for name in variants}}
        if args.paired:
            rounds = [times.index(min(times)) for times in took[list(variants)[-1]]]
            kept["paired"] = {name: [times[r] for times, r in zip(took[name], rounds)] for name in variants}
        first = next(iter(variants))
        for how, seconds in kept.items():
            speed = {name: sum(tokens[name]) / sum(seconds[name]) for name in variants}
            print(f"{spec} ({how}): " + "; ".join(f"{name} {speed[name]:.1f} tok/s ({speed[name] / speed[first]:.3f}), "
                                                  f"{sum(tokens[name]) / sum(cycles[name]):.2f} tokens/cycle"
                                                  for name in variants))


if __name__ == "__main__":
    main()
