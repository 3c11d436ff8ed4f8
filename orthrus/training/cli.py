"""`orthrus distill` and `orthrus train`."""

from __future__ import annotations

from pathlib import Path

from ..hub import cache_dir


def register(sub) -> None:
    d = sub.add_parser("distill", help="answer a prompt mix with the base model itself (training data for a drafter)")
    d.add_argument("--name", default="smollm2", help="output under ~/.cache/orthrus/distill/NAME (or use --out)")
    d.add_argument("--out", default=None, help="output folder (overrides --name)")
    d.add_argument("--model", default=None, help="base model folder or hub id (default SmolLM2-135M-Instruct)")
    d.add_argument("--count", type=int, default=30000, help="prompts to answer in total (a restart continues)")
    d.add_argument("--mix", default="chat:1,math:1,code:1", help="source weights")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--rows", type=int, default=16, help="sequences decoded together")
    d.add_argument("--max-new-tokens", type=int, default=256)
    d.add_argument("--max-prompt-tokens", type=int, default=512)
    d.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    d.add_argument("--top-p", type=float, default=1.0)
    d.add_argument("--dtype", default="float32", help="the precision the replies are decoded in (the drafter trains "
                   "against the fp32 model, and shards stay reproducible whatever `auto` means on a machine)")
    d.add_argument("--device", default="auto")
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    d.add_argument("--from-text", action="store_true",
                   help="take the replies from ShareGPT's own text instead of generating them (seconds, no model pass)")
    d.set_defaults(func=cmd_distill)

    t = sub.add_parser("train", help="train the drafter twins on distilled data (resumes the run if it exists)")
    t.add_argument("--data", default="smollm2", help="distilled data: a name under ~/.cache/orthrus/distill or a folder")
    t.add_argument("--run-dir", default="smollm2", help="run folder: a name under ~/.cache/orthrus/runs or a folder")
    t.add_argument("--model", default=None)
    t.add_argument("--block-size", type=int, default=16)
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--anchors", type=int, default=32, help="anchor blocks per row")
    t.add_argument("--batch", type=int, default=4, help="rows per micro-batch (per process)")
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--warmup", type=float, default=0.05, help="warmup fraction of the steps")
    t.add_argument("--steps", type=int, default=2000, help="optimizer steps of the whole run (the cosine's length)")
    t.add_argument("--loss", choices=["kl", "ce"], default="kl")
    t.add_argument("--position-decay", type=float, default=0.0,
                   help="weigh block row j's loss by exp(-j / DECAY): > 0 as acceptance weighs the drafts, < 0 the "
                        "later rows up (0: alike)")
    t.add_argument("--mix", default="", metavar="SOURCE:WEIGHT,...",
                   help="an epoch takes each training row as many times as its source's weight, e.g. chat:2,math:1,code:1 "
                        "(0 leaves a source out; default: every row once); the held-out rows stay as they are")
    t.add_argument("--walk-anchors", action="store_true",
                   help="train at the anchors greedy decoding with the drafter visits (after each cycle's accepted drafts), "
                        "up to --anchors a row, not at uniform ones: decoding lands where the drafter is weak more often")
    t.add_argument("--clip", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="bf16: the frozen backbone in bf16 under autocast; auto: bf16 where the hardware multiplies "
                        "bf16 natively (a GPU, a CPU with AVX512-BF16 or AMX), else fp32; fp32 master twins either way")
    t.add_argument("--device", default="auto")
    t.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp", help="under torchrun: DDP on the twins, or FSDP2 sharding the backbone too")
    t.add_argument("--checkpoint-minutes", type=float, default=5.0)
    t.add_argument("--eval-every", type=int, default=50, help="steps between held-out evaluations")
    t.add_argument("--eval-rows", type=int, default=8)
    t.add_argument("--log-every", type=int, default=5)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--init-from", default=None, metavar="DRAFTER",
                   help="a new run starts from this drafter folder's twins (e.g. another block size's export)")
    t.add_argument("--export", default=None, help="only export the run's last checkpoint as a drafter folder, then exit")
    t.add_argument("--export-storage", choices=["float", "int8"], default="int8", help="drafter storage for --export: bf16 floats or int8 deltas")
    t.add_argument("--export-block-size", type=int, default=None,
                   help="the exported drafter's default decode block (default: the trained block size)")
    t.add_argument("--export-draft-vocab", type=int, default=0, metavar="N",
                   help="the exported drafter drafts only the N tokens the run's data replies with most: a smaller "
                        "head in each draft pass, for large vocabularies (default 0: every token)")
    t.add_argument("--plot", action="store_true", help="only draw the run's curves (curves.png) and print the acceptance trend, then exit")
    t.set_defaults(func=cmd_train)


def folder(name: str, kind: str) -> Path:
    path = Path(name).expanduser()
    return path if (path.is_absolute() or name.startswith(".") or "/" in name) else cache_dir() / kind / name


def cmd_distill(args) -> None:
    import torch

    from ..api import load
    from .data import parse_mix
    from .distill import distill, write_text_data

    if args.threads:
        torch.set_num_threads(args.threads)
    mix = parse_mix(args.mix)
    llm = load(args.model, drafter="none", dtype=args.dtype, device=args.device)
    out = Path(args.out) if args.out else folder(args.name, "distill")
    if args.from_text:
        n = write_text_data(llm, out, args.count, seed=args.seed, max_prompt_tokens=args.max_prompt_tokens,
                            max_new_tokens=args.max_new_tokens)
        print(f"orthrus distill: {n} new rows of ShareGPT text in {out}")
        return
    n = distill(llm, out, args.count, mix, seed=args.seed, rows=args.rows,
                max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                temperature=args.temperature, top_p=args.top_p)
    print(f"orthrus distill: {n} new rows in {out}")


def cmd_train(args) -> None:
    import torch

    from .data import parse_mix
    from .trainer import TrainConfig, export_drafter, train

    if args.mix:
        parse_mix(args.mix)  # a malformed mix fails here, before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    run = folder(args.run_dir, "runs")
    if args.plot:
        show_curves(run)
        return
    if args.export:
        export_drafter(run, Path(args.export), storage=args.export_storage, model=args.model,
                       block_size=args.export_block_size, draft_vocab=args.export_draft_vocab)
        print(f"orthrus train: exported {run} to {args.export}")
        return
    cfg = TrainConfig(data=str(folder(args.data, "distill")), model=args.model, block_size=args.block_size,
                      seq_len=args.seq_len, anchors=args.anchors, batch=args.batch, grad_accum=args.grad_accum, lr=args.lr,
                      warmup=args.warmup, steps=args.steps, loss=args.loss, position_decay=args.position_decay, mix=args.mix,
                      walk_anchors=args.walk_anchors,
                      clip=args.clip, seed=args.seed, dtype=args.dtype, parallel=args.parallel,
                      checkpoint_minutes=args.checkpoint_minutes, eval_every=args.eval_every, eval_rows=args.eval_rows,
                      log_every=args.log_every, init_from=args.init_from)
    train(cfg, run, device=args.device)
    show_curves(run)


def show_curves(run: Path) -> None:
    """Draw the run's curves.png and print where it is and the acceptance trend."""
    from .trainer import acceptance_trend, describe_trend, plot_curves, read_log

    print(plot_curves(run))
    print(describe_trend(acceptance_trend(read_log(run))))
