"""Self-distillation: the base model answers the prompt mix through the engine's batched AR mode.

Resumable: prompt i is a pure function of (mix, seed, i); finished rows go to shards written
whole (temp file + rename) every `flush_rows` rows or `flush_seconds`, and a restart skips every
index already in a shard. A kill loses at most the rows of one unwritten shard.
"""

from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path

from ..engine import Engine, Sequence
from ..errors import OrthrusError
from ..sampling import SamplingParams
from .data import prompt_mix, read_shards, shard_files, text_rows


def write_shard(folder: Path, rows: list[dict]) -> Path:
    """The next shard, gzipped (no timestamp inside, so the same rows give the same bytes)."""
    number = len(shard_files(folder))
    path = folder / f"shard-{number:05d}.jsonl.gz"
    tmp = folder / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
        f.write(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode(), compresslevel=9, mtime=0))
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    return path


def check_settings(out: Path, meta: dict) -> None:
    """Record the data's settings in `out`/distill.json, or refuse to mix data made otherwise."""
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "distill.json"
    if meta_path.is_file():
        before = json.loads(meta_path.read_text())
        changed = {k: (before.get(k), v) for k, v in meta.items() if before.get(k) != v}
        if changed:
            raise OrthrusError(f"{out}: already holds distillation with other settings {changed} (old, new); "
                               "use another output folder.")
    else:
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")


def write_text_data(llm, out: Path, count: int, seed: int = 0, max_prompt_tokens: int = 512, max_new_tokens: int = 256,
                    shard_rows: int = 1000) -> int:
    """Shards of `text_rows` (ShareGPT's own replies, no generation) in `out`; deterministic, so a
    lost folder is remade identically by the same command. Returns the rows written by this call."""
    out = Path(out)
    check_settings(out, {"model": llm.name, "replies": "sharegpt-text", "seed": seed, "max_new_tokens": max_new_tokens,
                         "max_prompt_tokens": max_prompt_tokens})
    have = len(read_shards(out))
    rows = text_rows(llm, count, seed, max_prompt_tokens, max_new_tokens)[have:]
    for start in range(0, len(rows), shard_rows):
        write_shard(out, rows[start : start + shard_rows])
    return len(rows)


def distill(llm, out: Path, count: int, mix: dict[str, int], seed: int = 0, rows: int = 16, max_new_tokens: int = 256,
            max_prompt_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0, flush_rows: int = 64,
            flush_seconds: float = 120.0, progress: bool = True) -> int:
    """Answer prompts 0..count-1 of the mix into `out` (but the slots of a source whose prompts are
    used up: `prompt_mix`); returns the rows written by this call."""
    from tqdm import tqdm

    out = Path(out)
    check_settings(out, {"model": llm.name, "mix": mix, "seed": seed, "max_new_tokens": max_new_tokens,
                         "temperature": temperature, "top_p": top_p, "max_prompt_tokens": max_prompt_tokens})
    done = {r["index"] for r in read_shards(out)}
    prompts = prompt_mix(mix, seed, count)
    todo = [i for i in range(count) if i not in done and prompts[i] is not None]
    engine = Engine(llm.model, rows, max_prompt_tokens + max_new_tokens + 1, mode="ar")
    pending, buffer, written = iter(todo), [], 0
    meta_of: dict[int, tuple[int, str]] = {}
    last_flush, start, new_tokens = time.monotonic(), time.monotonic(), 0
    bar = tqdm(total=len(done) + len(todo), initial=len(done), unit="row", disable=not progress, dynamic_ncols=True,
               mininterval=5)

    def admit() -> bool:
        while len(engine.waiting) + len(engine.running) < rows:
            i = next(pending, None)
            if i is None:
                return False
            source, prompt = prompts[i]  # a user turn, or chat messages ending in one
            ids = llm.encode(prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}])
            if len(ids) > max_prompt_tokens:
                bar.update(1)  # too long for this run's context: skipped, and skipped again on resume
                buffer.append({"index": i, "source": source, "tokens": [], "prompt_len": 0, "finish": "skipped"})
                continue
            params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed * 1_000_003 + i if temperature > 0 else None)
            seq = Sequence(ids, params, max_new_tokens, llm.stop_token_ids)
            meta_of[seq.id] = (i, source)
            engine.add(seq)
        return True

    admit()
    while engine.has_work():
        for step in engine.step():
            seq = step.sequence
            new_tokens += len(step.new_tokens)
            if seq.finished:
                i, source = meta_of.pop(seq.id)
                buffer.append({"index": i, "source": source, "tokens": seq.prompt + seq.generated,
                               "prompt_len": len(seq.prompt), "finish": seq.finish_reason})
                bar.update(1)
        admit()
        elapsed = time.monotonic() - start
        bar.set_postfix_str(f"{new_tokens / max(elapsed, 1e-9):.0f} tok/s", refresh=False)
        if buffer and (len(buffer) >= flush_rows or time.monotonic() - last_flush > flush_seconds or not engine.has_work()):
            write_shard(out, buffer)
            written += len(buffer)
            buffer, last_flush = [], time.monotonic()
    if buffer:
        write_shard(out, buffer)
        written += len(buffer)
    bar.close()
    return written
