"""How far bf16 logits are from the fp32 model's: the kernels (this checkout's build, or the given
.so builds in turn) and the plain PyTorch bf16 path, against the fp32 model with the kernels off.
Each context: the long-docs prompts' text prefilled 64 tokens a pass, then one pass of --tokens
tokens; the rms distance of its logits. For numeric changes to the kernels (a change of summation
order or rounding moves bf16 logits; this says whether it moves them further than bf16 itself does).

    python benchmarks/bf16_fidelity.py [OLD.so NEW.so] --contexts 100,200,300,400,600 --tokens 32
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

import orthrus
from orthrus import kernels
from orthrus.cache import KVCache
from orthrus.engine import prefill

TEXT = Path(__file__).parent / "prompts" / "docs.jsonl"


def load_build(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).name.split(".")[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pass_logits(llm, ids: list[int], context: int, tokens: int) -> torch.Tensor:
    model = llm.model
    cache = KVCache(model.config, 1, context + tokens, next(model.parameters()).dtype, "cpu")
    rows = torch.tensor([0])
    with torch.inference_mode():
        prefill(model, cache, rows, [ids[:context]])
        window = cache.window(rows, tokens, bidirectional=False)
        return model(torch.tensor([ids[context : context + tokens]]), window.positions, window, "ar").float()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="*", help="kernel builds (.so) to compare; default: this checkout's")
    ap.add_argument("--contexts", default="100,200,300,400,600")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    reference, bf16 = orthrus.load(None, dtype="float32"), orthrus.load(None, dtype="bfloat16")
    ids = bf16.tokenizer(TEXT.read_text()).input_ids
    builds = {Path(p).name: load_build(p) for p in args.builds} or {"this build": kernels.module()}
    print("| context | " + " | ".join(builds) + " | plain bf16 |\n|---:|" + "---:|" * (len(builds) + 1))
    for context in map(int, args.contexts.split(",")):
        kernels.enabled = False
        want = pass_logits(reference, ids, context, args.tokens)
        plain = pass_logits(bf16, ids, context, args.tokens)
        kernels.enabled = True
        cells = []
        for build in builds.values():
            kernels._module = build  # decoder stacks are kept per build
            cells.append(pass_logits(bf16, ids, context, args.tokens))
        rms = [float((x - want).pow(2).mean().sqrt()) for x in [*cells, plain]]
        print(f"| {context} | " + " | ".join(f"{r:.4f}" for r in rms) + " |", flush=True)


if __name__ == "__main__":
    main()
