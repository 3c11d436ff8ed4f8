"""The engine's own time: wall time of `generate` minus the time spent in the model's passes
(`forward`, and `draft` with its head), per cycle (Orthrus) or per step (AR). What sampling,
acceptance, the planner, the cache bookkeeping and text decoding cost on top of the passes (prefill
included: it is a forward), the engine's functions that take most of it, per call, and the passes
themselves by kind and token count (ms each).

    python benchmarks/engine_overhead.py --max-new-tokens 128 --repeats 2 [--temperature 0.7] [--set mtbench]

With `--set` (a bench prompt set, chat-formatted as `orthrus bench` feeds it, seed = 1 + the prompt's index)
in place of the three raw prompts below: at temperature 0.7 the raw ones often end at once (SmolLM2
samples its end token after "...learning to paint."), leaving a few cycles to time.

Pause background jobs first.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

import orthrus
from orthrus import engine
from orthrus.bench.prompts import load_prompt_set

TIMED = ("plan_cycle", "plan_tree", "draw", "accept")  # engine functions timed per call

PROMPTS = [
    "Explain how binary search works, with Python code.",
    "Write a short story about a robot learning to paint.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
]


def time_outermost(record, *methods) -> None:
    """Wrap each (owner, name) so that record(name, args, seconds) follows every call not made inside
    another wrapped one (a draft pass's own forward is the draft's; a prefill's forwards, the prefill's)."""
    depth = [0]

    def timed(name, function):
        def run(*args, **kwargs):
            depth[0] += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    record(name, args, time.perf_counter() - start)
        return run

    for owner, name in methods:
        setattr(owner, name, timed(name, getattr(owner, name)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--set", default="", help="a bench prompt set (mtbench, humaneval, gsm or .jsonl) in place of the raw prompts")
    ap.add_argument("--num-prompts", type=int, default=3, help="prompts of --set")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    llm = orthrus.load(None)
    prompts = [llm.encode(p) for p in load_prompt_set(args.set, args.num_prompts).prompts] if args.set else PROMPTS
    in_forward = [0.0]
    by_shape = collections.defaultdict(lambda: [0.0, 0])  # (view, tokens): seconds, passes

    def record_pass(name, args, seconds):  # a pass: forward, or draft (which calls forward, then the draft head)
        tokens = args[1]
        in_forward[0] += seconds
        view = "draft" if name == "draft" else "prefill" if tokens.shape[1] > 16 else "ar"
        shape = by_shape[view, tokens.shape[1] if view != "prefill" else 0]
        shape[0], shape[1] = shape[0] + seconds, shape[1] + 1

    time_outermost(record_pass, (type(llm.model), "forward"), (type(llm.model), "draft"))
    spent = {name: [0.0, 0] for name in TIMED}

    def timed(name, function):
        def run(*a, **k):
            start = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                spent[name][0] += time.perf_counter() - start
                spent[name][1] += 1
        return run

    for name in TIMED:
        setattr(engine, name, timed(name, getattr(engine, name)))
    llm.generate(prompts[0], max_new_tokens=16)  # warm up
    for mode in ("orthrus", "ar"):
        for _ in range(args.repeats):
            in_forward[0], cycles, tokens = 0.0, 0, 0
            by_shape.clear()
            for entry in spent.values():
                entry[:] = [0.0, 0]
            start = time.perf_counter()
            for i, prompt in enumerate(prompts):
                out = llm.generate(prompt, max_new_tokens=args.max_new_tokens, mode=mode, temperature=args.temperature,
                                   seed=1 + i if args.set else 1)
                cycles, tokens = cycles + out.stats.cycles, tokens + len(out.token_ids)
            total = time.perf_counter() - start
            calls = ", ".join(f"{name} {seconds / n * 1e3:.2f}" for name, (seconds, n) in spent.items() if n)
            print(f"{mode}: {tokens / total:.1f} tok/s; per cycle {total / cycles * 1e3:.2f} ms, in forward passes "
                  f"{in_forward[0] / cycles * 1e3:.2f} ms, outside them {(total - in_forward[0]) / cycles * 1e3:.2f} ms "
                  f"(ms a call: {calls})")
            print("  passes (ms each): " + ", ".join(f"{view}{' ' + str(t) if t else ''} x{n} {seconds / n * 1e3:.2f}"
                                                    for (view, t), (seconds, n) in sorted(by_shape.items())))


if __name__ == "__main__":
    main()
