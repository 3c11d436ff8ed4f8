"""Metrics per prompt set from the runs, the Markdown table and the PNG plots.

Speeds are totals over the set (tokens / seconds, all prompts), so long answers weigh what they
cost. Speedups compare methods measured side by side in the same run.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..engine import acceptance_length, extension_accepted, position_acceptance
from .runner import METHODS, Run


def summarize(runs: list[Run], block_size: int) -> dict:
    """{set: {"prompts": n, "methods": {method: metrics}}}."""
    out: dict = {}
    for name in dict.fromkeys(r.set for r in runs):
        in_set = [r for r in runs if r.set == name]
        ar_tokens = {r.prompt: r.token_ids for r in in_set if r.method == "ar"}
        methods = {}
        for method in sorted({r.method for r in in_set}, key=METHODS.index):
            mine = [r for r in in_set if r.method == method]
            tokens, seconds, forwards = (sum(len(r.token_ids) for r in mine), sum(r.seconds for r in mine),
                                         sum(r.forwards for r in mine))
            m = {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 2),
                 "tokens_per_forward": round(tokens / forwards, 3) if forwards else None}
            if ar_tokens:
                m["exact_match_vs_ar"] = round(sum(r.token_ids == ar_tokens[r.prompt] for r in mine) / len(mine), 3)
            if method.startswith("orthrus"):
                cycles = [a for r in mine for a in r.accepted]
                by_source = [(src, a) for r in mine for src, a in zip(r.sources, r.accepted)]
                m["acceptance_length_by_source"] = {  # tokens per cycle, and the cycles, of each draft source
                    src: {"cycles": n, "acceptance_length": round(acceptance_length([a for s, a in by_source if s == src]), 3)}
                    for src in dict.fromkeys(s for s, _ in by_source) if (n := sum(s == src for s, _ in by_source))}
                m["tree_leaves_accepted"] = sum(sum(r.branches) for r in mine)  # drafter cycles a leaf lengthened
                m["lookup_extension_accepted"] = sum(sum(extension_accepted(r.accepted, r.drafted, r.extended)) for r in mine)
                m["cycles"] = len(cycles)
                m["acceptance_length"] = round(acceptance_length(cycles), 3)
                m["position_acceptance"] = [round(x, 3) for x in position_acceptance(cycles, block_size)]
                m["acceptance_length_histogram"] = {str(k): v for k, v in sorted(Counter(a + 1 for a in cycles).items())}
            methods[method] = m
        for m in methods.values():
            for base in ("ar", "hf"):
                if base in methods:
                    m[f"speedup_vs_{base}"] = round(m["tokens_per_second"] / methods[base]["tokens_per_second"], 3)
        out[name] = {"prompts": len({r.prompt for r in in_set}), "methods": methods}
    return out


def _fmt(x, spec=".2f", unit="") -> str:
    return "-" if x is None else format(x, spec) + unit


def markdown_table(summary: dict) -> str:
    lines = ["| set | method | tokens | tok/s | speedup vs AR | speedup vs HF | acceptance length | tokens/forward | exact match vs AR |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in summary.items():
        for method, m in s["methods"].items():
            lines.append(f"| {name} ({s['prompts']}) | {method} | {m['tokens']} | {m['tokens_per_second']:.1f} | "
                         f"{_fmt(m.get('speedup_vs_ar'), unit='x')} | {_fmt(m.get('speedup_vs_hf'), unit='x')} | "
                         f"{_fmt(m.get('acceptance_length'))} | {_fmt(m['tokens_per_forward'])} | "
                         f"{_fmt(m.get('exact_match_vs_ar'), '.0%')} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, folder: Path, title: str) -> list[Path]:
    """Per-position acceptance, acceptance-length histogram (orthrus) and speedup bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    orthrus = {name: s["methods"]["orthrus"] for name, s in summary.items() if "orthrus" in s["methods"]}
    if orthrus:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, m in orthrus.items():
            ax.plot(range(1, len(m["position_acceptance"]) + 1), m["position_acceptance"], marker="o", ms=3, label=name)
        ax.set(xlabel="draft position", ylabel="fraction of cycles accepted", ylim=(0, 1.02),
               title=f"Per-position acceptance\n{title}")
        ax.grid(alpha=0.3), ax.legend()
        written.append(_save(fig, folder / "position_acceptance.png"))

        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(orthrus)
        for i, (name, m) in enumerate(orthrus.items()):
            hist = {int(k): v for k, v in m["acceptance_length_histogram"].items()}
            total = sum(hist.values())
            ax.bar([k - 0.4 + width * (i + 0.5) for k in hist], [v / total for v in hist.values()], width, label=name)
        ax.set(xlabel="tokens per cycle (accepted drafts + 1)", ylabel="fraction of cycles",
               title=f"Acceptance length\n{title}")
        ax.grid(alpha=0.3, axis="y"), ax.legend()
        written.append(_save(fig, folder / "acceptance_length_histogram.png"))

    methods = list(dict.fromkeys(m for s in summary.values() for m in s["methods"]))
    bases = [b for b in ("ar", "hf") if all(b in s["methods"] for s in summary.values())]
    if bases:
        fig, axes = plt.subplots(1, len(bases), figsize=(6 * len(bases), 4), squeeze=False)
        width = 0.8 / len(methods)
        for ax, base in zip(axes[0], bases):
            for i, method in enumerate(methods):
                values = [s["methods"].get(method, {}).get(f"speedup_vs_{base}", 0) for s in summary.values()]
                ax.bar([j - 0.4 + width * (i + 0.5) for j in range(len(summary))], values, width, label=method)
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_xticks(range(len(summary)), list(summary))
            ax.set(ylabel=f"tokens/s relative to {base}", title=f"Speedup vs {'our AR' if base == 'ar' else 'HF generate'}")
            ax.grid(alpha=0.3, axis="y"), ax.legend(fontsize=8)
        fig.suptitle(title, fontsize=9)
        written.append(_save(fig, folder / "speedup.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
