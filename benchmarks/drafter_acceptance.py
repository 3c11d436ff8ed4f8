"""Greedy acceptance of a drafter against the untrained twin copy on the first N GSM-style eval
prompts (orthrus.bench, seed GSM_EVAL_SEED), in one process: the export check for a new drafter.

    python benchmarks/drafter_acceptance.py DRAFTER_FOLDER [--prompts 3] [--max-new-tokens 64] [--block-size 16]
"""

import argparse
import json

import torch

import orthrus
from orthrus.bench.prompts import gsm
from orthrus.checkpoint import load_drafter
from orthrus.engine import acceptance_length, position_acceptance


def acceptance(llm, prompts, max_new_tokens: int, block_size: int) -> dict:
    accepted = [a for out in llm.generate(prompts, max_new_tokens=max_new_tokens, block_size=block_size)
                for a in out.stats.accepted]
    return {"tokens_per_cycle": round(acceptance_length(accepted), 3), "cycles": len(accepted),
            "position_acceptance": [round(x, 3) for x in position_acceptance(accepted, block_size)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("drafter")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(1)
    prompts = gsm(args.prompts)
    llm = orthrus.load(drafter="none", dtype="float32", device="cpu")
    print("untrained", json.dumps(acceptance(llm, prompts, args.max_new_tokens, args.block_size)), flush=True)
    load_drafter(llm.model, args.drafter)
    print(args.drafter, json.dumps(acceptance(llm, prompts, args.max_new_tokens, args.block_size)), flush=True)


if __name__ == "__main__":
    main()
