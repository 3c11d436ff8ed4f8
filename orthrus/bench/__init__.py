"""Benchmarks: prompt sets, the side-by-side runner (orthrus, AR, HF generate, HF prompt lookup),
metrics, tables and plots. `orthrus bench` is the command; benchmarks/ holds the sweeps."""

from .prompts import GSM_EVAL_SEED, PROMPT_SETS, load_prompt_set

__all__ = ["GSM_EVAL_SEED", "PROMPT_SETS", "load_prompt_set"]
