"""Engine-level timing for the scaling sweeps (context length, batch size) and the GPU cycle-cost
script: prefill and decode timed apart, plus the KV cache each mode allocates.

Sequences run with no stop tokens, so both modes emit exactly `max_new_tokens` per row and their
decode throughputs compare like for like.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from ..engine import Engine, Sequence, acceptance_length
from ..model import OrthrusLM


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset. CPU: the process' peak RSS (monotonic)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_decode(model: OrthrusLM, prompts: list[list[int]], mode: str, block_size: int | None, max_new_tokens: int) -> dict:
    """Decode every prompt together (one batch) and time prefill and decode apart.

    The first engine step prefills and runs one cycle; decode speed is measured over the steps
    after it, so a long prompt's prefill does not hide the per-token cost at that context."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    block = 1 if mode == "ar" else (block_size or model.config.block_size)
    engine = Engine(model, len(prompts), max(map(len, prompts)) + max_new_tokens + block, mode=mode, block_size=block_size)
    seqs = [Sequence(p, max_new_tokens=max_new_tokens) for p in prompts]
    for s in seqs:
        engine.add(s)
    start = time.perf_counter()
    engine.step()
    synchronize(device)
    first = time.perf_counter()
    first_tokens, first_cycles = sum(len(s.generated) for s in seqs), sum(s.stats.cycles for s in seqs)
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    synchronize(device)
    end = time.perf_counter()
    tokens = sum(len(s.generated) for s in seqs) - first_tokens
    cycles = sum(s.stats.cycles for s in seqs) - first_cycles
    accepted = [a for s in seqs for a in s.stats.accepted]
    return {
        "mode": mode, "rows": len(prompts), "prompt_tokens": sum(map(len, prompts)),
        "prefill_seconds": round(first - start, 4), "decode_seconds": round(end - first, 4),
        "decode_tokens": tokens, "decode_tokens_per_second": round(tokens / (end - first), 2) if steps else None,
        "ms_per_step": round(1000 * (end - first) / steps, 3) if steps else None,
        "tokens_per_cycle": round(acceptance_length(accepted), 3),
        "row_cycles": cycles, "kv_bytes": engine.cache.nbytes, "peak_memory_mib": round(peak_memory_mib(device), 1),
    }


def compare_modes(model: OrthrusLM, points: list[int], prompts_for, block_size: int, max_new_tokens: int, name: str) -> list[dict]:
    """For each sweep point, decode `prompts_for(point)` in AR and orthrus mode, alternating which
    goes first so machine drift hits both; rows carry both results and their ratios."""
    rows = []
    for i, point in enumerate(points):
        prompts = prompts_for(point)
        modes = ["ar", "orthrus"] if i % 2 == 0 else ["orthrus", "ar"]
        result = {m: timed_decode(model, prompts, m, block_size, max_new_tokens) for m in modes}
        ar, orth = result["ar"], result["orthrus"]
        rows.append({name: point, "ar": ar, "orthrus": orth,
                     "speedup": round(orth["decode_tokens_per_second"] / ar["decode_tokens_per_second"], 3),
                     "cycle_cost_in_ar_steps": round(orth["ms_per_step"] / ar["ms_per_step"], 3)})
        print(f"{name} {point}: done", file=sys.stderr, flush=True)
    return rows


def save_sweep(path: str, llm, max_new_tokens: int, rows: list[dict]) -> None:
    Path(path).write_text(json.dumps({"block_size": llm.block_size, "max_new_tokens": max_new_tokens,
                                      "drafter": llm.drafter if llm.drafter_trained else "untrained twin copy",
                                      "rows": rows}, indent=1) + "\n")
