"""What one Orthrus cycle costs on a GPU, on Qwen3-8B- and Qwen3-1.7B-shaped models with random
weights (built from ModelConfig, nothing downloaded). Acceptance is meaningless with random
weights; cost is not. Measures, per model:

- copy bandwidth (device-to-device, bytes read + written) and the AR decode-step floor:
  weight bytes read per step (+ the KV cache at that context) / bandwidth
- one AR decode step, one draft pass and one verify pass (block 16 and 32), by CUDA events,
  after warm-up, median of many
- the context sweep: engine-level decode, AR vs orthrus, ms per step and per cycle
- from these, the wall-clock speedup an acceptance length tau buys: tau * t_AR_step / t_cycle

    python benchmarks/gpu_cycle_cost.py --out gpu_cycle_cost.json          # on the device machine
    python benchmarks/gpu_cycle_cost.py --device cpu --tiny                # a quick check of the script
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orthrus.cache import KVCache  # noqa: E402
from orthrus.config import ModelConfig  # noqa: E402
from orthrus.model import OrthrusLM  # noqa: E402
from orthrus.bench.sweeps import timed_decode  # noqa: E402

QWEN3 = dict(vocab_size=151936, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, model_type="qwen3",
             rope_theta=1000000.0, eos_token_id=[151645], mask_token_id=151669)
SHAPES = {
    "qwen3-8b": ModelConfig(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                            tie_word_embeddings=False, **QWEN3),
    "qwen3-1.7b": ModelConfig(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                              tie_word_embeddings=True, **QWEN3),
    "tiny": ModelConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, mask_token_id=1000),
}
TAUS = (2, 3, 4, 6, 8, 10)


def random_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> OrthrusLM:
    """Random weights straight into `dtype` on `device` (no fp32 copy of an 8B model)."""
    with torch.device("meta"):
        model = OrthrusLM(cfg).to(dtype)
    model.to_empty(device=device).tie_weights()
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norm weights
                p.uniform_(0.9, 1.1, generator=g)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval().requires_grad_(False)


def median_ms(fn, device: torch.device, warmup: int = 5, reps: int = 30) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def copy_bandwidth(device: torch.device, dtype: torch.dtype, mib: int) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus written."""
    src = torch.randn(mib * 2**20 // dtype.itemsize, device=device).to(dtype)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * src.nbytes / (ms / 1000)


def ar_weight_bytes(model: OrthrusLM) -> int:
    """Bytes of weights one AR decode step reads: every AR parameter except the embedding table
    (one row is read), and the head (which may be the embedding, tied) once."""
    twins = {name for name, _ in model.twin_parameters()}
    total = sum(p.nbytes for name, p in model.named_parameters() if name not in twins and name != "model.embed_tokens.weight")
    return total + (model.lm_head.weight.nbytes if model.config.tie_word_embeddings else 0)


def pass_latencies(model: OrthrusLM, context: int, blocks: list[int], device: torch.device) -> dict:
    """AR decode step, draft pass and verify pass over a cache holding `context` random tokens."""
    cfg = model.config
    cache = KVCache(cfg, 1, context + max(blocks), next(model.parameters()).dtype, device)
    cache.k.normal_(), cache.v.normal_()  # never time on zeros
    cache.lengths[0] = context
    rows = torch.tensor([0])
    tokens = torch.randint(0, cfg.vocab_size - 1, (1, max(blocks)), device=device)

    def forward(n: int, view: str, bidirectional: bool):
        block = tokens[:, :n].clone()
        if view == "diffusion":
            block[:, 1:] = cfg.mask_token_id
        def run():
            window = cache.window(rows, n, bidirectional)
            model(block, window.positions, window, view)
        return run

    with torch.inference_mode():
        out = {"ar_step_ms": median_ms(forward(1, "ar", False), device)}
        for b in blocks:
            out[f"draft_{b}_ms"] = median_ms(forward(b, "diffusion", True), device)
            out[f"verify_{b}_ms"] = median_ms(forward(b, "ar", False), device)
    return {k: round(v, 3) for k, v in out.items()}


def measure(name: str, cfg: ModelConfig, args, device: torch.device, dtype: torch.dtype, bandwidth: float) -> dict:
    model = random_model(cfg, dtype, device)
    weight_bytes = ar_weight_bytes(model)
    kv_bytes_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize
    contexts = [min(c, cfg.max_position_embeddings - 64) for c in args.contexts]
    passes = {}
    for c in contexts:
        lat = pass_latencies(model, c, args.blocks, device)
        lat["floor_ms"] = round(1000 * (weight_bytes + c * kv_bytes_per_token) / bandwidth, 3)
        passes[c] = lat
        print(f"{name}: passes at context {c} done", file=sys.stderr, flush=True)
    sweep = []
    for c in contexts:
        prompt = torch.randint(0, cfg.vocab_size - 1, (c,)).tolist()
        for b in args.blocks:
            ar = timed_decode(model, [prompt], "ar", b, args.new_tokens)
            orth = timed_decode(model, [prompt], "orthrus", b, args.new_tokens)
            sweep.append({"context": c, "block": b, "ar_ms_per_step": ar["ms_per_step"], "orthrus_ms_per_cycle": orth["ms_per_step"],
                          "ar_peak_mib": ar["peak_memory_mib"], "orthrus_peak_mib": orth["peak_memory_mib"],
                          "ar_kv_mib": round(ar["kv_bytes"] / 2**20, 1), "orthrus_kv_mib": round(orth["kv_bytes"] / 2**20, 1)})
        print(f"{name}: engine sweep at context {c} done", file=sys.stderr, flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"weight_bytes": weight_bytes, "kv_bytes_per_token": kv_bytes_per_token, "passes": passes, "engine_sweep": sweep}


def report(results: dict, bandwidth: float, blocks: list[int]) -> None:
    print(f"\ncopy bandwidth: {bandwidth / 1e9:.0f} GB/s (read + write)")
    for name, r in results.items():
        print(f"\n### {name} (AR weights read per step: {r['weight_bytes'] / 2**30:.2f} GiB)\n")
        print("| context | AR step ms | floor ms | AR/floor | " + " | ".join(f"draft {b} ms | verify {b} ms" for b in blocks) + " |")
        print("|---:|---:|---:|---:|" + "---:|---:|" * len(blocks))
        for c, p in r["passes"].items():
            print(f"| {c} | {p['ar_step_ms']:.2f} | {p['floor_ms']:.2f} | {p['ar_step_ms'] / p['floor_ms']:.2f} | "
                  + " | ".join(f"{p[f'draft_{b}_ms']:.2f} | {p[f'verify_{b}_ms']:.2f}" for b in blocks) + " |")
        print("\n| context | block | AR ms/step | orthrus ms/cycle | cycle / step | "
              + " | ".join(f"speedup at tau={t}" for t in TAUS) + " | KV MiB AR | KV MiB orthrus | peak MiB AR | peak MiB orthrus |")
        print("|---:|---:|---:|---:|---:|" + "---:|" * len(TAUS) + "---:|---:|---:|---:|")
        for s in r["engine_sweep"]:
            ratio = s["orthrus_ms_per_cycle"] / s["ar_ms_per_step"]
            print(f"| {s['context']} | {s['block']} | {s['ar_ms_per_step']:.2f} | {s['orthrus_ms_per_cycle']:.2f} | {ratio:.2f} | "
                  + " | ".join(f"{t / ratio:.2f}x" for t in TAUS)
                  + f" | {s['ar_kv_mib']} | {s['orthrus_kv_mib']} | {s['ar_peak_mib']} | {s['orthrus_peak_mib']} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--models", default="qwen3-8b,qwen3-1.7b", help=f"comma-separated, from {', '.join(SHAPES)}")
    p.add_argument("--tiny", action="store_true", help="the tiny shape and small contexts: checks the script (CPU)")
    p.add_argument("--blocks", default="16,32")
    p.add_argument("--contexts", default="1024,4096,16384,32768")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per engine-sweep run")
    p.add_argument("--copy-mib", type=int, default=1024, help="buffer size of the bandwidth measurement")
    p.add_argument("--out", default="gpu_cycle_cost.json")
    args = p.parse_args()
    if args.tiny:
        args.models, args.contexts, args.copy_mib = "tiny", "64,256", 64
    args.blocks = [int(b) for b in args.blocks.split(",")]
    args.contexts = [int(c) for c in args.contexts.split(",")]
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_cycle_cost: no CUDA device here; use --device cpu --tiny to check the script")
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(device, dtype, args.copy_mib)
    results = {name: measure(name, SHAPES[name], args, device, dtype, bandwidth) for name in args.models.split(",")}
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": args.dtype,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "copy_bandwidth_bytes_per_s": bandwidth}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    report(results, bandwidth, args.blocks)


if __name__ == "__main__":
    main()
