"""Where a drafter training step's time goes (issue: trainer throughput).

Times the parts of one micro-batch of `orthrus train` at a run's own settings and data, in the
order the trainer runs them: the AR pass alone (no graph), the dual pass (that AR pass plus the
diffusion pass with a graph), the heads and the KL (`draft_loss`, which also forms the gradient
for the student's states), and the backward. Pause any background training first.

    python benchmarks/train_step_profile.py --run-dir smollm2-b4-text --threads 1 --dtype fp32
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from orthrus.hub import cache_dir
from orthrus.training import trainer
from orthrus.training.data import draw_anchors


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="a run folder, or its name under the cache's runs/")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="as `orthrus train --dtype`")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run_dir) if Path(args.run_dir).is_dir() else cache_dir() / "runs" / args.run_dir
    state = json.loads((trainer.Checkpoints(run).latest() / "state.json").read_text())
    settings = state["config"]
    cfg = trainer.TrainConfig(data=settings["data"], model=settings["model"], block_size=settings["block_size"],
                              seq_len=settings["seq_len"], anchors=settings["anchors"], batch=1)
    _, model = trainer.load_base(cfg, torch.device("cpu"))
    trainer.prepare_model(model)
    dtype = trainer.train_dtype(args.dtype, torch.device("cpu"))
    if dtype == "bf16":
        trainer.backbone_to_bf16(model)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    packed, order = trainer.epoch_rows(cfg, state["files"], 0)
    rows = packed.select(order[:1])
    anchors, valid = draw_anchors(rows, cfg.anchors, cfg.block_size, 0, order[:1].tolist())
    parts: dict[str, float] = {}

    def timed(name, fn):
        start = time.perf_counter()
        out = fn()
        parts[name] = parts.get(name, 0.0) + time.perf_counter() - start
        return out

    for _ in range(args.repeats):
        with autocast:
            with torch.no_grad():
                timed("AR pass alone (no graph)", lambda: model(rows.tokens, rows.positions,
                                                                 trainer.RecordingStore(trainer.ar_mask(rows.doc)), "ar", logits=False))
            student, teacher, ok = timed("dual pass (AR + diffusion forward)",
                                         lambda: trainer.dual_pass(model, rows, anchors, cfg.block_size))
            ok &= valid[:, :, None]
            loss = timed("heads and KL (with the student's gradient)", lambda: trainer.draft_loss(model, student, teacher, ok, "kl"))
        timed("backward", loss.backward)
        model.zero_grad(set_to_none=True)
    tokens = int((rows.doc >= 0).sum())
    step = sum(v for k, v in parts.items() if not k.startswith("AR pass")) / args.repeats
    print(f"{tokens} tokens in the row, {int(ok.sum())} draft targets, {args.threads} thread(s); one micro-batch {step:.2f} s "
          f"= {tokens / step:.0f} tokens/s")
    print("| part | s | share |\n|---|---:|---:|")
    for name, seconds in parts.items():
        share = "" if name.startswith("AR pass") else f"{seconds / args.repeats / step:.0%}"
        print(f"| {name} | {seconds / args.repeats:.2f} | {share} |")


if __name__ == "__main__":
    main()
