"""Simulated greedy acceptance of draft trees against the plain block draft, on held-out rows
(issue 10: is a token tree worth its verify rows?).

A tree of n drafts is built best-first from the drafter's per-position distributions (DDTree): a
path's score is the product of its tokens' draft probabilities; the block draft is the chain of
top tokens. A cycle accepts the longest prefix of the AR argmax continuation that is a
path of the tree. The anchors are the trainer's held-out blocks (`evaluate`).

    python benchmarks/tree_acceptance.py --data data/distill/smollm2 sharegpt-text --nodes 3 4 5 6 7
"""

from __future__ import annotations

import argparse
import heapq

import torch

import orthrus
from orthrus.checkpoint import load_drafter
from orthrus.training.data import shard_files
from orthrus.training.trainer import TrainConfig, draw_anchors, dual_pass, eval_set

from heldout_acceptance import data_folder


def best_first_tree(probs: torch.Tensor, nodes: int, width: int = 4) -> set[tuple[int, ...]]:
    """The `nodes` most probable paths (as token tuples) under independent per-position `probs` [D, V]."""
    top_p, top_i = probs.topk(width, -1)
    top_p, top_i = top_p.tolist(), top_i.tolist()
    heap = [(-top_p[0][0], (0,))]  # paths as rank tuples
    tree = set()
    while heap and len(tree) < nodes:
        neg, ranks = heapq.heappop(heap)
        depth = len(ranks) - 1
        tree.add(tuple(top_i[d][r] for d, r in enumerate(ranks)))
        if depth + 1 < len(top_p):  # its first child
            heapq.heappush(heap, (neg * top_p[depth + 1][0], ranks + (0,)))
        if ranks[-1] + 1 < width:  # its next sibling
            heapq.heappush(heap, (neg / top_p[depth][ranks[-1]] * top_p[depth][ranks[-1] + 1], ranks[:-1] + (ranks[-1] + 1,)))
    return tree


def chain_with_siblings(probs: torch.Tensor, siblings: int, width: int = 4) -> set[tuple[int, ...]]:
    """The chain of top tokens plus the `siblings` most probable other tokens at its positions, as
    leaves: path (chain[:j], alternative at j), scored by the product of their draft probabilities."""
    top_p, top_i = probs.topk(width, -1)
    chain = top_i[:, 0].tolist()
    tree = {tuple(chain[: d + 1]) for d in range(len(chain))}
    prefix = top_p[:, 0].cumprod(0) / top_p[:, 0]  # probability of the chain before position j
    scores = (prefix[:, None] * top_p[:, 1:]).flatten()
    for index in scores.topk(min(siblings, scores.numel())).indices.tolist():
        j, r = divmod(index, width - 1)
        tree.add(tuple(chain[:j]) + (int(top_i[j, r + 1]),))
    return tree


def accepted(tree: set[tuple[int, ...]], target: list[int]) -> int:
    a = 0
    while a < len(target) and tuple(target[: a + 1]) in tree:
        a += 1
    return a


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--drafter", default="orthrus/drafters/smollm2-135m-instruct")
    ap.add_argument("--nodes", type=int, nargs="+", default=[3, 4, 5, 6, 7])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    llm = orthrus.load(drafter="none", dtype="float32", device="cpu")
    load_drafter(llm.model, args.drafter)
    model, block = llm.model, llm.model.config.block_size
    print("| data | blocks | block draft | " + " | ".join(f"tree of {n}" for n in args.nodes) + " |")
    print("|---|---:|---:|" + "---:|" * len(args.nodes))
    for name in args.data:
        folder = data_folder(name)
        cfg = TrainConfig(data=str(folder), block_size=block, seq_len=512, anchors=128, eval_rows=args.rows)
        rows = eval_set(cfg, [p.name for p in shard_files(folder)])
        anchors, valid = draw_anchors(rows, cfg.anchors, block, cfg.seed + 1, list(range(len(rows))), full_blocks=True)
        with torch.inference_mode():
            student, teacher, _ = dual_pass(model, rows, anchors, block)
            probs = model.lm_head(student).float().softmax(-1)[valid]  # [N, B-1, V]
            target = model.lm_head(teacher).argmax(-1)[valid].tolist()
        chains = [set(tuple(p.argmax(-1)[: d + 1].tolist()) for d in range(block - 1)) for p in probs]
        means = [sum(1 + accepted(c, t) for c, t in zip(chains, target)) / len(target)]
        for n in args.nodes:
            means.append(sum(1 + accepted(best_first_tree(p, n), t) for p, t in zip(probs, target)) / len(target))
        print(f"| {name} | {len(target)} | " + " | ".join(f"{m:.3f}" for m in means) + " |", flush=True)
        leaves = [sum(1 + accepted(chain_with_siblings(p, n - (block - 1)), t) for p, t in zip(probs, target)) / len(target)
                  for n in args.nodes if n >= block - 1]
        print(f"| {name}, block draft + leaves | {len(target)} | - | " + " | ".join(f"{m:.3f}" for m in leaves) + " |", flush=True)


if __name__ == "__main__":
    main()
