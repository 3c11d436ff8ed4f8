"""Server metrics in the Prometheus text format (0.0.4), named like vLLM's under `orthrus:`.

Written by the engine thread (tokens, latencies, drafts, queue sizes) and the event loop
(request outcomes), so every update takes one lock.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)

OUTCOMES = ("stop", "length", "disconnect", "timeout", "rejected", "error")  # labels of requests_total

# name -> (type, help); every family is exposed from the start, at zero
FAMILIES = {
    "orthrus:num_requests_running": ("gauge", "Requests decoding in the batch."),
    "orthrus:num_requests_waiting": ("gauge", "Requests queued for a free batch row."),
    "orthrus:requests_total": ("counter", "Finished requests by outcome."),
    "orthrus:prompt_tokens_total": ("counter", "Prompt tokens of admitted requests."),
    "orthrus:generation_tokens_total": ("counter", "Generated tokens."),
    "orthrus:spec_decode_num_drafts_total": ("counter", "Drafts verified, by source (diffusion: the drafter; lookup: "
                                                        "prompt lookup); a plain AR step is none."),
    "orthrus:spec_decode_num_draft_tokens_total": ("counter", "Draft tokens verified, by source."),
    "orthrus:spec_decode_num_accepted_tokens_total": ("counter", "Draft tokens accepted by verification, by source "
                                                                 "(tree: a leaf beside the drafter's block)."),
    "orthrus:spec_decode_num_accepted_tokens_per_pos": ("counter", "Accepted draft tokens by position in the draft "
                                                                   "(0 = the first drafted token), by source."),
    "orthrus:kv_cache_usage_perc": ("gauge", "Fraction of the KV cache's slots holding committed tokens (0 to 1)."),
    "orthrus:e2e_request_latency_seconds": ("histogram", "Time from arrival to the last token, of requests the "
                                                         "engine finished (stop or length)."),
    "orthrus:request_queue_time_seconds": ("histogram", "Time from arrival to the start of the cycle that gave the "
                                                        "request a batch row."),
    "orthrus:time_to_first_token_seconds": ("histogram", "Time from arrival to the first generated token."),
    "orthrus:inter_token_latency_seconds": ("histogram", "Time per generated token after the first "
                                                         "(a cycle's gap shared by the tokens it emitted)."),
}


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, escaped)) + "}"


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += times
        self.sum += value * times

    def lines(self, name: str, labels: dict[str, str]) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip((*self.buckets, "+Inf"), self.counts):
            cumulative += count
            out.append(f"{name}_bucket{_labels({**labels, 'le': str(bound)})} {cumulative}")
        out.append(f"{name}_sum{_labels(labels)} {self.sum}")
        out.append(f"{name}_count{_labels(labels)} {cumulative}")
        return out


class Metrics:
    def __init__(self, model_name: str):
        self.labels = {"model_name": model_name}
        self.lock = threading.Lock()
        self.values: dict[str, dict[tuple, float]] = defaultdict(dict)  # name -> {extra label items: value}
        self.histograms = {name: Histogram() for name, (kind, _) in FAMILIES.items() if kind == "histogram"}
        for name, (kind, _) in FAMILIES.items():
            if kind != "histogram":
                self.values[name][()] = 0
        self.values["orthrus:requests_total"] = {(("outcome", o),): 0 for o in OUTCOMES}

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            self.values[name][key] = self.values[name].get(key, 0) + amount

    def set(self, name: str, value: float) -> None:
        with self.lock:
            self.values[name][()] = value

    def observe(self, name: str, value: float, times: int = 1) -> None:
        with self.lock:
            self.histograms[name].observe(value, times)

    def get(self, name: str, **labels: str) -> float:
        with self.lock:
            return self.values[name].get(tuple(sorted(labels.items())), 0)

    def render(self) -> str:
        lines = []
        with self.lock:
            for name, (kind, help) in FAMILIES.items():
                lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
                if kind == "histogram":
                    lines += self.histograms[name].lines(name, self.labels)
                    continue
                for key, value in self.values[name].items():
                    lines.append(f"{name}{_labels({**self.labels, **dict(key)})} {value}")
        return "\n".join(lines) + "\n"
