"""`orthrus bench`: every method on every prompt set, side by side; writes bench.json, bench.md
and PNG plots into --out."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

from ..cli import add_model_args
from ..errors import OrthrusError
from ..sampling import SamplingParams
from .prompts import PROMPT_SETS, load_prompt_set
from .report import markdown_table, plot, summarize
from .runner import DEFAULT_METHODS, METHODS, Runner, check_methods, runs_as_dicts


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def cmd_bench(args) -> None:
    import torch

    from ..api import load
    from ..hub import DEFAULT_MODEL, default_gguf, resolve_model

    methods = check_methods(args.methods.split(","))  # user mistakes first, before the slow loads
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    sets = [load_prompt_set(spec, args.num_prompts) for spec in args.sets.split(",") if spec]
    if not sets:
        raise OrthrusError("--sets is empty: name at least one prompt set")
    folder = resolve_model(args.model)
    gguf = None
    if "llama.cpp" in methods:
        gguf = Path(args.gguf) if args.gguf else (default_gguf() if args.model in (None, DEFAULT_MODEL) else None)
        if gguf is None:
            raise OrthrusError("the llama.cpp method needs the model as a GGUF file: give --gguf PATH")
    llm = load(str(folder), drafter=args.drafter, dtype=args.dtype, device=args.device, block_size=args.block_size,
               draft_dtype=args.draft_dtype)
    runner = Runner(llm, folder, methods, args.max_new_tokens, sampling, args.seed, args.block_size, args.draft_confidence, gguf,
                    args.repeats)
    log = (lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True))
    runs = runner.run(sets, progress=log)

    param = next(llm.model.parameters())
    drafter = llm.drafter if llm.drafter_trained else "untrained twin copy"
    config = {"model": str(args.model or llm.name), "drafter": drafter, "dtype": str(param.dtype).removeprefix("torch."),
              "device": str(param.device), "block_size": llm.block_size,
              "draft_dtype": "int8" if llm.model.int8_drafts else str(param.dtype).removeprefix("torch."),
              "draft_confidence": args.draft_confidence, "methods": runner.methods,
              "sets": [s.name for s in sets], "prompts_per_set": args.num_prompts, "max_new_tokens": args.max_new_tokens,
              "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed, "repeats": args.repeats,
              "machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d"),
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    summary = summarize(runs, config["block_size"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"config": config, "summary": summary, "runs": runs_as_dicts(runs)}, indent=1) + "\n")
    table = markdown_table(summary)
    (out / "bench.md").write_text(table)
    title = f"{Path(config['model']).name}, drafter: {drafter}, {config['dtype']}, block {config['block_size']}"
    plot(summary, out, title)
    print(table)
    print(f"bench: wrote {out}/bench.json, bench.md and plots", file=sys.stderr)


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark orthrus, AR, HF generate and HF prompt lookup side by side")
    p.add_argument("--sets", default=",".join(PROMPT_SETS),
                   help=f"comma-separated prompt sets: {', '.join(PROMPT_SETS)} or .jsonl files (default: all three)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)}; "
                        "llama.cpp needs llama-cpp-python)")
    p.add_argument("--gguf", default=None, help="the model as a GGUF, for the llama.cpp method (default model: its shipped GGUF)")
    p.add_argument("--num-prompts", type=int, default=10, help="prompts per set (default 10)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = no limit; every method)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the nucleus of this mass (1 = all; every method)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the first prompt (prompt i uses seed + i)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each method on each prompt, in turn; the fastest is kept (default 1)")
    p.add_argument("--out", default="bench-out", help="output folder for bench.json, bench.md and the PNG plots")
    add_model_args(p)
    p.set_defaults(func=cmd_bench)
