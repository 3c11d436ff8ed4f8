"""Whether two builds of the CPU kernels give the same bits: logits (and the cache's K/V) of the
default model's passes, every view, a few token counts and cache lengths, bf16 and fp32, each
build loaded in turn into this process. For kernel changes meant to be speed only.

    python benchmarks/same_bits.py OLD.so NEW.so    (build each as benchmarks/kernel_ab.py says)
"""

from __future__ import annotations

import argparse

import torch
from kernel_ab import load_build

import orthrus
from orthrus import kernels
from orthrus.cache import KVCache


def pass_outputs(llm, dtype: str) -> dict[str, torch.Tensor]:
    """Logits of passes of 1, 4 and 8 tokens in both views after 37 and 300 prompt tokens (prefilled
    by the same build), and the K/V the prefill wrote."""
    model, out = llm.model, {}
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for context in (37, 300):
            cache = KVCache(model.config, 1, context + 8, next(model.parameters()).dtype, "cpu")
            rows = torch.tensor([0])
            window = cache.window(rows, context, bidirectional=False)
            model(torch.randint(0, 1000, (1, context), generator=g), window.positions, window, "ar", logits=False)
            cache.lengths[0] = context
            out[f"{dtype} k {context}"] = cache.k[:, 0, :, :context].float().clone()
            for view in ("ar", "diffusion"):
                for tokens in (1, 4, 8):
                    window = cache.window(rows, tokens, bidirectional=view == "diffusion")
                    x = torch.randint(0, 1000, (1, tokens), generator=g)
                    out[f"{dtype} {view} {tokens} after {context}"] = model(x, window.positions, window, view).clone()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="one build (.so)")
    ap.add_argument("b", help="the other build (.so)")
    ap.add_argument("--draft-dtype", default="auto")
    args = ap.parse_args(argv)
    builds = [load_build(args.a), load_build(args.b)]
    kernels.module()
    differ = 0
    for dtype in ("bfloat16", "float32"):
        llm = orthrus.load(None, dtype=dtype, device="cpu", draft_dtype=args.draft_dtype)
        outputs = []
        for build in builds:
            kernels._module = build
            outputs.append(pass_outputs(llm, dtype))
        for key in outputs[0]:
            same = torch.equal(outputs[0][key], outputs[1][key])
            differ += not same
            print(f"{key}: {'same' if same else 'DIFFERENT'}")
    print("every output the same bits" if not differ else f"{differ} outputs differ")


if __name__ == "__main__":
    main()
