"""A drafter's chance temperatures (`trainer.fit_chance_temperatures`: per draft position, the
temperature at which its distribution gives the chance that greedy verification keeps a token there):
fit them on a data folder's held-out rows, as `orthrus train --export` does for a new drafter, and
`--write` them into the drafter's config.json (how the shipped drafter got its own):

    python benchmarks/chance_temperatures.py --drafter orthrus/drafters/smollm2-135m-instruct \\
        --data data/distill/smollm2 --write

`--calibration N`: greedy decoding of N held-out prompts with the drafter every cycle; per draft
position, the drafter's 4 likeliest tokens' mean chance against how often each is the model's
choice, at temperature 1 and at the drafter's (with `--temperature T`: sampling, and how often drafts
are accepted against the q they were drawn from). `--ab SETS` (prompt sets, `heldout` for 40 held-out
prompts): the planner with and without them, per set: tokens a cycle and tokens per modeled second
(each pass costed by the planner's own calibrated pass costs, so the comparison has no timing noise);
with `--temperature T`, a sampling row's drafts weighed at their own q (the planner before) against
its recent acceptance rates (`SequenceStats.draft_rates`).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

import orthrus
from orthrus import engine
from orthrus.bench.prompts import load_prompt_set
from orthrus.engine import Engine, Sequence
from orthrus.sampling import SamplingParams
from orthrus.training.data import read_shards, shard_files, split_held_out
from orthrus.training.trainer import CHANCE_FIT_ROWS, fit_chance_temperatures_on

from generate_ab import modeled_passes


def held_out_prompts(data: str, count: int, skip: int = 0) -> list[list[int]]:
    """Prompts (token ids) of the data's held-out conversations, in a fixed shuffled order."""
    _, held = split_held_out(read_shards(Path(data), [p.name for p in shard_files(Path(data))]))
    random.Random(0).shuffle(held)
    return [list(r["tokens"][: r["prompt_len"]]) for r in held if 1 < r["prompt_len"] < 600][skip : skip + count]


def decode(llm, prompts: list[list[int]], temperature: float = 0.0, seed: int = 0, **engine_options) -> list[Sequence]:
    """Each prompt alone, 128 new tokens; prompt i sampled with seed `seed + i`."""
    seqs = []
    for i, ids in enumerate(prompts):
        e = Engine(llm.model, 1, len(ids) + 140, pass_costs=llm.pass_costs(llm.block_size), **engine_options)
        seqs.append(Sequence(ids, SamplingParams(temperature=temperature, seed=seed + i), 128, llm.stop_token_ids))
        e.add(seqs[-1])
        while e.has_work():
            e.step()
    return seqs


def calibration(llm, prompts: list[list[int]], temperature: float) -> None:
    cycles, draft_logits = [], []  # per cycle (draft logits [B-1, V], the model's choices [B-1], drafts accepted)
    drawn = []  # sampling: per cycle q(d) of each draft, from the distribution it was drawn from
    draw, accept = engine.draw, engine.accept

    def recording_draw(logits, *a):
        tokens, probs = draw(logits, *a)
        draft_logits.append(logits[0].clone())
        if probs is not None:
            drawn.append(probs[0].gather(-1, tokens[0][:, None]).squeeze(-1).tolist())
        return tokens, probs

    def recording_accept(logits, *a, **kw):
        out = accept(logits, *a, **kw)
        if draft_logits:
            drafted = draft_logits[-1].shape[0]
            cycles.append((draft_logits.pop(), logits[0, :drafted].argmax(-1), int(out[0][0])))
        return out

    engine.draw, engine.accept = recording_draw, recording_accept
    try:
        decode(llm, prompts, temperature, sources=("diffusion",))
    finally:
        engine.draw, engine.accept = draw, accept
    if temperature > 0:  # acceptance against q(d), in bins of q
        print(f"{len(cycles)} drafter cycles at temperature {temperature}; per draft position (where the drafts before "
              "it were accepted), drafts with q(d) in each fifth of [0, 1]: how many / mean q(d) / accepted")
        for j in range(llm.block_size - 1):
            bins = [[0, 0.0, 0] for _ in range(5)]
            for q, (_, _, accepted) in zip(drawn, cycles):
                if accepted >= j:
                    b = bins[min(int(q[j] * 5), 4)]
                    b[0], b[1], b[2] = b[0] + 1, b[1] + q[j], b[2] + (accepted > j)
            print(f"| {j + 1} | " + " | ".join(f"{n} / {q / max(n, 1):.2f} / {a / max(n, 1):.2f}" for n, q, a in bins) + " |")
        return
    temperatures = llm.model.chance_temperatures or (1.0,)
    print(f"{len(cycles)} drafter cycles; per draft position (where the drafts before it were right), the 4 likeliest "
          "tokens' mean chance / how often each was the model's choice")
    for j in range(llm.block_size - 1):
        rows = [(logits[j], chosen[j]) for logits, chosen, accepted in cycles if accepted >= j]
        logits, chosen = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        for t in (1.0, temperatures[min(j, len(temperatures) - 1)]):
            top = (logits / t).softmax(-1).topk(4, -1)
            kept = (top.indices == chosen[:, None]).float().mean(0)
            cells = [f"{float(top.values[:, r].mean()):.3f} / {float(kept[r]):.3f}" for r in range(4)]
            print(f"| {j + 1} | {t} | {len(rows)} | " + " | ".join(cells) + " |")


def ab(llm, sets: list[str], data: str, temperature: float, seeds: int) -> None:
    """Greedy: the planner without and with the drafter's chance temperatures. Sampling: a row's drafts
    counted at their own q (what the planner did before) and at the row's recent rates (`draft_rates`)."""
    plan_tree = engine.plan_tree

    def plan_tree_at_q(seqs, logits, drafts, *a, **k):  # each row's drafts at their own q, as "rates" (on its own stats)
        q = logits.log_softmax(-1).gather(-1, drafts[..., None]).squeeze(-1).exp().tolist()
        for s, row in zip(seqs, q):
            s.stats.draft_rates = lambda positions, window=16, row=row: row
        return plan_tree(seqs, logits, drafts, *a, **k)

    fitted = llm.model.chance_temperatures
    variants = ((("without", ()), ("with", fitted)) if temperature == 0 else (("q", plan_tree_at_q), ("rates", plan_tree)))
    try:
        with modeled_passes(llm) as spent:
            for spec in sets:
                prompts = held_out_prompts(data, 40, skip=40) if spec == "heldout" else [
                    llm.encode(chat) for chat in load_prompt_set(spec, 10).prompts]
                result = {}
                for name, setting in variants:
                    if temperature == 0:
                        llm.model.chance_temperatures = setting
                    else:
                        engine.plan_tree = setting
                    spent[:], tokens, cycles = [], 0, 0
                    for seed in range(seeds if temperature > 0 else 1):
                        seqs = decode(llm, prompts, temperature, seed=1000 * seed)
                        tokens, cycles = tokens + sum(len(s.generated) for s in seqs), cycles + sum(s.stats.cycles for s in seqs)
                    result[name] = (tokens / cycles, tokens / sum(spent))
                (c0, r0), (c1, r1) = result.values()
                print(f"| {spec} | {c0:.3f} | {c1:.3f} | {r0:.1f} | {r1:.1f} | {r1 / r0:.3f}x |", flush=True)
    finally:
        engine.plan_tree = plan_tree
        llm.model.chance_temperatures = fitted


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", required=True, help="a drafter folder")
    ap.add_argument("--data", required=True, help="a distilled data folder (its held-out rows are used)")
    ap.add_argument("--rows", type=int, default=CHANCE_FIT_ROWS, help="held-out packed rows of 512 tokens to fit on")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="store the fit in the drafter's config.json")
    ap.add_argument("--calibration", type=int, default=0, metavar="N", help="the calibration table over N held-out prompts")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of --calibration and --ab (0: greedy)")
    ap.add_argument("--seeds", type=int, default=3, help="--ab's sampling runs a prompt (seeds 0, 1000, ... + the prompt's index)")
    ap.add_argument("--ab", default="", metavar="SETS", help="the planner with and without them on these prompt sets")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.calibration or args.ab:
        llm = orthrus.load(drafter=args.drafter)  # as decoding runs: the default dtype, drafts on the kernels
        if args.calibration:
            calibration(llm, held_out_prompts(args.data, args.calibration), args.temperature)
        if args.ab:
            names = ("without", "with") if args.temperature == 0 else ("at q", "at rates")
            print(f"| set | tokens a cycle, {names[0]} | {names[1]} | tokens per modeled s, {names[0]} | {names[1]} | ratio |")
            ab(llm, args.ab.split(","), args.data, args.temperature, args.seeds)
        return
    llm = orthrus.load(drafter=args.drafter, dtype="float32", device="cpu")
    temperatures, fit_rows = fit_chance_temperatures_on(llm.model, args.data, rows=args.rows)
    print(f"{args.drafter}: chance temperatures {temperatures} (draft positions 1..{llm.block_size - 1}, "
          f"{fit_rows} held-out rows of {args.data})")
    if args.write:
        path = Path(args.drafter) / "config.json"
        config = json.loads(path.read_text())
        config["chance_temperatures"] = temperatures
        path.write_text(json.dumps(config, indent=2) + "\n")
        print(f"written to {path}")


if __name__ == "__main__":
    main()
