"""Prometheus metrics (prometheus-client), one registry per app instance."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2.5)


class Metrics:
    """Every figure the daemon exports; also the scheduler's observer."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("appliance_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("appliance_prompt_tokens", "prompt tokens received",
                                     registry=r)
        self.completion_tokens = Counter("appliance_completion_tokens", "tokens generated",
                                         registry=r)
        self.ttft = Histogram("appliance_time_to_first_token_seconds",
                              "from request to first generated text", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.inter_token = Histogram("appliance_inter_token_latency_seconds",
                                     "gap between streamed chunks", buckets=TOKEN_GAP_BUCKETS,
                                     registry=r)
        self.queue_wait = Histogram("appliance_queue_wait_seconds",
                                    "from submission to a free slot", buckets=LATENCY_BUCKETS,
                                    registry=r)
        self.batch_tokens = Histogram("appliance_batch_tokens", "tokens per decode step",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.batch_sequences = Histogram("appliance_batch_sequences",
                                         "sequences active per decode step",
                                         buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.decode_seconds = Counter("appliance_decode_seconds",
                                      "engine time spent inside llama_decode", registry=r)
        self.step_seconds = Counter("appliance_engine_step_seconds",
                                    "engine time in decode steps: llama_decode, sampling, text",
                                    registry=r)
        self.prefix_hit_tokens = Counter("appliance_prefix_cache_hit_tokens",
                                         "prompt tokens reused from the KV cache", registry=r)
        self.model_load_seconds = Gauge("appliance_model_load_seconds",
                                        "how long the last model load took", registry=r)
        self.queue_depth = Gauge("appliance_queue_depth", "requests waiting for a slot",
                                 registry=r)
        self.slots_busy = Gauge("appliance_slots_busy", "slots decoding a request", registry=r)
        self.vram_used = Gauge("appliance_vram_used_bytes", "GPU memory in use (NVML)", ["gpu"],
                               registry=r)
        # Per upstream: what we proxied, how it went, and how long its answers took to start.
        self.upstream_requests = Counter("appliance_upstream_requests",
                                         "requests proxied to an upstream, by the status we "
                                         "answered", ["upstream", "status"], registry=r)
        self.upstream_errors = Counter("appliance_upstream_errors",
                                       "proxied requests that failed on our side of the "
                                       "upstream (unreachable, timeout, bad answer)",
                                       ["upstream", "kind"], registry=r)
        self.upstream_latency = Histogram("appliance_upstream_latency_seconds",
                                          "from sending to an upstream to its response "
                                          "headers (a whole answer when not streamed)",
                                          ["upstream"], buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_up = Gauge("appliance_upstream_up",
                                 "1 if the upstream's last check or request reached it",
                                 ["upstream"], registry=r)
        self.vram_total = Gauge("appliance_vram_total_bytes", "GPU memory in total (NVML)",
                                ["gpu"], registry=r)

    # SchedulerObserver
    def on_step(self, batch_tokens: int, sequences: int, decode_s: float,
                step_s: float) -> None:
        self.batch_tokens.observe(batch_tokens)
        self.batch_sequences.observe(sequences)
        self.decode_seconds.inc(decode_s)
        self.step_seconds.inc(step_s)

    def on_admit(self, queue_wait_s: float, prompt_tokens: int, cached_tokens: int) -> None:
        self.queue_wait.observe(queue_wait_s)
        self.prefix_hit_tokens.inc(cached_tokens)

    def render(self, refresh: Callable[[Metrics], None]) -> bytes:
        """The exposition text, after `refresh` has set the point-in-time gauges."""
        refresh(self)
        return generate_latest(self.registry)
