"""The server's counters, gauges and histograms, written in Prometheus's text exposition format
(version 0.0.4) for GET /metrics. Thread-safe: the engine's thread and the event loop both add.

    minigpt_requests_total{endpoint,status}      answered requests
    minigpt_refused_total{reason}                queue_full (429), draining (503)
    minigpt_prompt_tokens_total, minigpt_completion_tokens_total
    minigpt_joules_total{phase}                  prefill, decode (facility joules, × PUE)
    minigpt_queue_depth, minigpt_running_sequences
    minigpt_batch_size                           histogram: sequences per decode step
    minigpt_request_latency_seconds              histogram: arrival to last token
    minigpt_time_to_first_token_seconds          histogram
"""

import math
import threading

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

HELP = {
    "minigpt_requests_total": ("counter", "Requests answered, by endpoint and HTTP status."),
    "minigpt_refused_total": ("counter", "Requests refused for load: queue_full (429), draining (503)."),
    "minigpt_prompt_tokens_total": ("counter", "Prompt tokens of finished generations."),
    "minigpt_completion_tokens_total": ("counter", "Tokens generated."),
    "minigpt_joules_total": ("counter", "Energy of the model's steps in joules (x PUE), by phase."),
    "minigpt_queue_depth": ("gauge", "Sequences waiting for a slot in the running batch."),
    "minigpt_running_sequences": ("gauge", "Sequences in the running batch."),
    "minigpt_batch_size": ("histogram", "Sequences per decode step."),
    "minigpt_request_latency_seconds": ("histogram", "Seconds from a request's arrival to its end."),
    "minigpt_time_to_first_token_seconds": ("histogram", "Seconds from arrival to the first token."),
}
BUCKETS = {"minigpt_batch_size": BATCH_BUCKETS,
           "minigpt_request_latency_seconds": LATENCY_BUCKETS,
           "minigpt_time_to_first_token_seconds": LATENCY_BUCKETS}


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    pairs = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in sorted(labels.items()))
    return "{" + pairs + "}"


def _number(x: float) -> str:
    if x == math.inf:
        return "+Inf"
    return repr(int(x)) if float(x).is_integer() else repr(float(x))


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.values: dict[tuple[str, str], float] = {}  # (name, labels text) -> value
        self.hist: dict[str, list] = {name: [[0] * len(b), 0, 0.0] for name, b in BUCKETS.items()}

    def add(self, name: str, amount: float = 1.0, **labels) -> None:
        key = (name, _labels(labels))
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def set(self, name: str, value: float) -> None:
        with self.lock:
            self.values[(name, "")] = value

    def get(self, name: str, **labels) -> float:
        with self.lock:
            return self.values.get((name, _labels(labels)), 0.0)

    def observe(self, name: str, value: float) -> None:
        with self.lock:
            counts, _, _ = h = self.hist[name]
            for i, edge in enumerate(BUCKETS[name]):
                if value <= edge:
                    counts[i] += 1
            h[1] += 1
            h[2] += value

    def text(self) -> str:
        """Every metric in the text exposition format, HELP and TYPE first."""
        lines = []
        with self.lock:
            for name, (kind, help_) in HELP.items():
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
                if kind == "histogram":
                    counts, count, total = self.hist[name]
                    for edge, c in zip(BUCKETS[name], counts):
                        lines.append(f'{name}_bucket{{le="{_number(edge)}"}} {c}')
                    lines += [f'{name}_bucket{{le="+Inf"}} {count}', f"{name}_sum {_number(total)}",
                              f"{name}_count {count}"]
                    continue
                rows = [(labels, v) for (n, labels), v in sorted(self.values.items()) if n == name]
                for labels, v in rows or [("", 0.0)]:
                    lines.append(f"{name}{labels} {_number(v)}")
        return "\n".join(lines) + "\n"
