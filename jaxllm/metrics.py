"""Prometheus metrics under LightLLM's names and buckets (GET /metrics), the push-gateway thread
(--metric_gateway) and the periodic stats log line (--log_stats_interval)."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import basic_auth_handler, choose_encoder, default_handler, push_to_gateway

from jaxllm.thread_names import os_named

logger = logging.getLogger(__name__)

DURATION_BUCKETS = tuple(0.001 * 1.5**k for k in range(1, 36))  # 1.5 ms … ≈ 1.4 h
BATCH_SIZE_BUCKETS = tuple(float(n) for n in range(1, 129))
RATIO_BUCKETS = tuple(round(0.1 * i, 1) for i in range(11))     # 0.0, 0.1, … 1.0
BATCH_METHODS = ("prefill", "decode")


def length_buckets(max_len: int) -> tuple[float, ...]:
    """Hundredths of `max_len`: max_len/100, 2·max_len/100, … max_len."""
    return tuple(max_len / 100.0 * (i + 1) for i in range(100))


class Metrics:
    """Every metric of the server in a registry of its own (several can live in one process, e.g. in tests).
    prometheus-client exposes a counter `x` as `x_total`."""

    def __init__(self, max_req_input_len: int, max_req_total_len: int):
        self.registry = CollectorRegistry()
        reg = self.registry

        def histogram(name: str, doc: str, buckets: Iterable[float], labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(name, doc, labelnames=labels, buckets=tuple(buckets), registry=reg)

        self.request_count = Counter("lightllm_request_count", "The total number of requests", registry=reg)
        self.request_success = Counter("lightllm_request_success", "The number of successful requests", registry=reg)
        self.request_failure = Counter("lightllm_request_failure", "The number of failed requests", registry=reg)
        self.batch_inference_count = Counter(
            "lightllm_batch_inference_count", "The number of prefill steps / decode steps", ["method"], registry=reg
        )
        self.prompt_cache_hit_tokens = Counter(
            "lightllm_prompt_cache_hit_tokens", "Prompt tokens served from the prompt cache", registry=reg
        )
        self.prompt_cache_prompt_tokens = Counter(
            "lightllm_prompt_cache_prompt_tokens", "Prompt tokens of requests looked up in the prompt cache",
            registry=reg,
        )

        self.request_duration = histogram("lightllm_request_duration", "Duration of the request (s)",
                                          DURATION_BUCKETS)
        self.request_validation_duration = histogram(
            "lightllm_request_validation_duration", "Validation time of the request", DURATION_BUCKETS)
        self.request_inference_duration = histogram(
            "lightllm_request_inference_duration", "Inference time of the request", DURATION_BUCKETS)
        self.request_mean_time_per_token_duration = histogram(
            "lightllm_request_mean_time_per_token_duration", "Per token time of the request", DURATION_BUCKETS)
        self.request_first_token_duration = histogram(
            "lightllm_request_first_token_duration", "First token time of the request", DURATION_BUCKETS)
        self.request_queue_duration = histogram(
            "lightllm_request_queue_duration", "Queue duration of requests", DURATION_BUCKETS)
        self.request_input_length = histogram(
            "lightllm_request_input_length", "Length of the input tokens", length_buckets(max_req_input_len))
        self.request_generated_tokens = histogram(
            "lightllm_request_generated_tokens", "Number of generated tokens", length_buckets(max_req_total_len))
        self.request_max_new_tokens = histogram(
            "lightllm_request_max_new_tokens", "Max new token", length_buckets(max_req_total_len))
        self.batch_inference_duration = histogram(
            "lightllm_batch_inference_duration", "Inference time of prefill step / decode step", DURATION_BUCKETS,
            ("method",))
        self.batch_next_size = histogram("lightllm_batch_next_size", "Batch size of the next new batch",
                                         BATCH_SIZE_BUCKETS)
        self.cache_length = histogram("lightllm_cache_length", "Length of tokens which hit prompt cache",
                                      length_buckets(max_req_input_len))
        self.cache_ratio = histogram("lightllm_cache_ratio", "cache length / input_length", RATIO_BUCKETS)

        self.queue_size = Gauge("lightllm_queue_size", "Queue size", registry=reg)
        self.batch_current_size = Gauge("lightllm_batch_current_size", "Current batch size", registry=reg)
        self.batch_pause_size = Gauge("lightllm_batch_pause_size", "The number of pause requests", registry=reg)
        self.batch_current_max_tokens = Gauge(
            "lightllm_batch_current_max_tokens", "dynamic max token used for current batch", registry=reg)

        for method in BATCH_METHODS:  # both series exist from the start, at zero
            self.batch_inference_count.labels(method=method)
            self.batch_inference_duration.labels(method=method)

    @classmethod
    def from_args(cls, args: Any) -> "Metrics":
        """Metrics sized by the server flags (--max_req_input_len, --max_req_total_len)."""
        return cls(args.max_req_input_len, args.max_req_total_len)

    def request_received(self) -> None:
        """A generation request arrived (before validation)."""
        self.request_count.inc()

    def request_finished(
        self,
        *,
        success: bool,
        duration_s: float,
        validation_s: float = 0.0,
        inference_s: float = 0.0,
        queue_s: float = 0.0,
        first_token_s: float = 0.0,
        input_len: int = 0,
        generated_tokens: int = 0,
        max_new_tokens: int = 0,
    ) -> None:
        """A request was answered. Times in seconds: `duration_s` arrival → answer, `validation_s` arrival →
        handed to the engine, `queue_s` waiting for admission, `first_token_s` arrival → first token,
        `inference_s` handed to the engine → last token. A failed request counts as a failure and only its
        duration is observed (its other figures would skew the histograms); a successful one feeds them all."""
        self.request_duration.observe(duration_s)
        if not success:
            self.request_failure.inc()
            return
        self.request_success.inc()
        self.request_validation_duration.observe(validation_s)
        self.request_inference_duration.observe(inference_s)
        self.request_queue_duration.observe(queue_s)
        self.request_first_token_duration.observe(first_token_s)
        self.request_input_length.observe(input_len)
        self.request_generated_tokens.observe(generated_tokens)
        self.request_max_new_tokens.observe(max_new_tokens)
        if generated_tokens > 0:
            # LightLLM's definition: (last token − first token) / tokens generated.
            after_first = max(validation_s + inference_s - first_token_s, 0.0)
            self.request_mean_time_per_token_duration.observe(after_first / generated_tokens)

    def batch_step(self, method: str, duration_s: float, batch_size: int) -> None:
        """One engine step ran: "prefill" (a step that admits new requests; its size is the new batch's) or
        "decode"."""
        if method not in BATCH_METHODS:
            raise ValueError(f"batch_step method {method!r} is not one of {', '.join(BATCH_METHODS)}")
        self.batch_inference_count.labels(method=method).inc()
        self.batch_inference_duration.labels(method=method).observe(duration_s)
        if method == "prefill":
            self.batch_next_size.observe(batch_size)

    def set_load(self, *, queue_size: int, running: int, paused: int, max_tokens: int) -> None:
        """The scheduler's current load: waiting, running and paused requests, and the estimated peak tokens
        of the running batch (LightLLM's dynamic max load × --max_total_token_num)."""
        self.queue_size.set(queue_size)
        self.batch_current_size.set(running)
        self.batch_pause_size.set(paused)
        self.batch_current_max_tokens.set(max_tokens)

    def prompt_cache(self, hit_tokens: int, prompt_tokens: int) -> None:
        """A request's prompt was looked up in the prompt cache: `hit_tokens` of its `prompt_tokens` were
        cached (LightLLM's cache_length / cache_ratio histograms, and our hit / prompt token counters)."""
        if not 0 <= hit_tokens <= prompt_tokens:
            raise ValueError(f"prompt cache hit of {hit_tokens} tokens out of a {prompt_tokens}-token prompt")
        self.cache_length.observe(hit_tokens)
        self.cache_ratio.observe(hit_tokens / prompt_tokens if prompt_tokens else 0.0)
        self.prompt_cache_hit_tokens.inc(hit_tokens)
        self.prompt_cache_prompt_tokens.inc(prompt_tokens)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, content type) of GET /metrics for the request's Accept header: the Prometheus text format
        (version 0.0.4 when the client names none), or OpenMetrics when asked for."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


def parse_grouping_key(pairs: Iterable[str] | Mapping[str, str]) -> dict[str, str]:
    """--grouping_key values ("key=value", repeatable) as a dict."""
    if isinstance(pairs, Mapping):
        return {str(k): str(v) for k, v in pairs.items()}
    key = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--grouping_key {pair!r} must have the form key=value")
        key[name] = value
    return key


class _PeriodicThread:
    """A daemon thread calling `tick` every `interval_s` seconds (first at once, or after one interval) until
    stop(); an exception in `tick` is logged and the thread goes on."""

    def __init__(self, name: str, interval_s: float, tick: Callable[[], None], *, at_once: bool):
        if interval_s <= 0:
            raise ValueError(f"{name}: the interval must be positive, got {interval_s}")
        self.name, self.interval_s = name, float(interval_s)
        self._tick, self._at_once = tick, at_once
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=os_named(self._run), name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float | None = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        if not self._at_once and self._stopping.wait(self.interval_s):
            return
        while True:
            try:
                self._tick()
            except Exception:
                logger.exception("%s failed; trying again in %.3g s", self.name, self.interval_s)
            if self._stopping.wait(self.interval_s):
                return


class _PeriodicWorker:
    """What a periodic daemon worker exposes: its interval and whether its thread runs."""

    _thread: _PeriodicThread

    @property
    def interval_s(self) -> float:
        return self._thread.interval_s

    @property
    def running(self) -> bool:
        """Whether the worker's thread is alive."""
        return self._thread.running


class MetricsPusher(_PeriodicWorker):
    """Pushes a registry to a Prometheus push gateway every `interval_s` seconds (PUT /metrics/job/<job>/<k>/<v>…),
    with HTTP basic auth from $USERNAME / $PASSWORD when `auth`. A failed push is logged and retried at the next
    interval (LightLLM's pusher died on the first failure)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        gateway: str,
        *,
        job: str = "lightllm",
        interval_s: float = 10.0,
        grouping_key: Iterable[str] | Mapping[str, str] = (),
        auth: bool = False,
        environ: Mapping[str, str] | None = None,
        timeout_s: float = 10.0,
    ):
        if not gateway:
            raise ValueError("a metrics push gateway (HOST:PORT) is required")
        self.registry = registry
        self.gateway = gateway
        self.job = job
        self.grouping_key = parse_grouping_key(grouping_key)
        self.timeout_s = timeout_s
        self.pushes = 0      # successful pushes
        self.failures = 0    # failed pushes
        self._failing = False
        self._thread = _PeriodicThread("metrics-pusher", interval_s, self._push_logged, at_once=True)
        self._handler = default_handler
        if auth:
            env = os.environ if environ is None else environ
            missing = [name for name in ("USERNAME", "PASSWORD") if not env.get(name)]
            if missing:
                raise ValueError(
                    f"--enable_monitor_auth needs the push gateway's user and password in the environment "
                    f"variables USERNAME and PASSWORD; {' and '.join(missing)} not set"
                )
            username, password = env["USERNAME"], env["PASSWORD"]

            def handler(url, method, timeout, headers, data):
                return basic_auth_handler(url, method, timeout, headers, data, username, password)

            self._handler = handler

    @classmethod
    def from_args(cls, args: Any, registry: CollectorRegistry) -> "MetricsPusher | None":
        """The pusher the flags ask for (--metric_gateway, --job_name, --grouping_key, --push_interval,
        --enable_monitor_auth), not started; None without --metric_gateway."""
        if not args.metric_gateway:
            return None
        return cls(registry, args.metric_gateway, job=args.job_name, interval_s=args.push_interval,
                   grouping_key=args.grouping_key, auth=args.enable_monitor_auth)

    def push(self) -> None:
        """Push the registry once (raises on failure)."""
        push_to_gateway(self.gateway, job=self.job, registry=self.registry, grouping_key=self.grouping_key,
                        timeout=self.timeout_s, handler=self._handler)

    def start(self) -> None:
        """Push now, then every interval, from a daemon thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop pushing (waits for a push in flight)."""
        self._thread.stop(self.timeout_s + 1.0)

    def _push_logged(self) -> None:
        try:
            self.push()
        except Exception as err:
            self.failures += 1
            self._failing = True
            logger.warning("metrics push to %s failed (%s: %s); retrying in %.3g s",
                           self.gateway, type(err).__name__, err, self.interval_s)
            return
        self.pushes += 1
        if self._failing:
            self._failing = False
            logger.info("metrics push to %s works again", self.gateway)


class StatsLogger(_PeriodicWorker):
    """Logs one line of engine statistics every `interval_s` seconds. `stats` returns the engine's counters
    (Engine.stats()): running, waiting, paused (requests), kv_used, kv_total (KV token slots), prefill_tokens
    (prompt tokens computed), decode_tokens (tokens generated) (totals since start), and, if it tracks them, prompt_cache_hit_tokens and prompt_cache_query_tokens (totals:
    cached tokens found, prompt tokens looked up); without those the hit rate comes from `metrics`' prompt-cache
    counters when given, else it reads "n/a". Throughputs and the hit rate are over the interval."""

    def __init__(self, stats: Callable[[], Mapping[str, float]], interval_s: float = 10.0, *,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.monotonic):
        self._stats = stats
        self._metrics = metrics
        self._clock = clock
        self._prev: Mapping[str, float] = {}   # counters start from zero at creation
        self._prev_at = clock()
        self._thread = _PeriodicThread("stats-logger", interval_s, self.log_once, at_once=False)

    @classmethod
    def from_args(cls, args: Any, stats: Callable[[], Mapping[str, float]],
                  metrics: Metrics | None = None) -> "StatsLogger | None":
        """The logger the flags ask for (--log_stats_interval), not started; None with --disable_log_stats."""
        if args.disable_log_stats:
            return None
        return cls(stats, args.log_stats_interval, metrics=metrics)

    def start(self) -> None:
        """Log a line every interval from a daemon thread, the first one interval from now."""
        self._prev, self._prev_at = self._snapshot(), self._clock()
        self._thread.start()

    def stop(self) -> None:
        """Stop logging."""
        self._thread.stop()

    def log_once(self) -> str:
        """Read the stats, log the line (rates since the previous line, or since start) and return it."""
        now, cur = self._clock(), self._snapshot()
        line = format_stats(self._prev, cur, now - self._prev_at)
        self._prev, self._prev_at = cur, now
        logger.info("%s", line)
        return line

    def _snapshot(self) -> dict[str, float]:
        cur = dict(self._stats())
        if "prompt_cache_query_tokens" not in cur and self._metrics is not None:
            sample = self._metrics.registry.get_sample_value
            cur["prompt_cache_hit_tokens"] = sample("lightllm_prompt_cache_hit_tokens_total") or 0.0
            cur["prompt_cache_query_tokens"] = sample("lightllm_prompt_cache_prompt_tokens_total") or 0.0
        return cur


def _host_time(prev: Mapping[str, float], cur: Mapping[str, float]) -> str:
    """The interval's host time per step and its parts (scheduling, preparing and waiting for the launch, reading
    results; the launch thread's call; the wait for the device), and the share of steps launched on an idle
    device; "" without steps or without the engine's host counters."""
    steps = cur.get("steps", 0) - prev.get("steps", 0)
    if not steps or "host_s" not in cur:
        return ""

    def per_step_ms(key: str) -> float:
        return 1000.0 * (cur.get(key, 0.0) - prev.get(key, 0.0)) / steps

    idle = 100.0 * (cur.get("steps_after_idle", 0) - prev.get("steps_after_idle", 0)) / steps
    parts = ", ".join(f"{name} {per_step_ms(name + '_s'):.2f}"
                      for name in ("schedule", "dispatch", "postprocess") if name + "_s" in cur)
    return (f"host {per_step_ms('host_s'):.2f} ms/step"
            + (f" [{parts}]" if parts else "")
            + (f", launch {per_step_ms('launch_s'):.2f}" if "launch_s" in cur else "")
            + (f", device wait {per_step_ms('device_wait_s'):.2f}" if "device_wait_s" in cur else "")
            + f", {idle:.0f}% launched on an idle device")


def format_stats(prev: Mapping[str, float], cur: Mapping[str, float], elapsed_s: float) -> str:
    """The stats line for the interval between two snapshots of the engine's counters (see StatsLogger)."""
    elapsed_s = max(elapsed_s, 1e-9)

    def rate(key: str) -> float:
        return (cur[key] - prev.get(key, 0)) / elapsed_s

    kv_pct = 100.0 * cur["kv_used"] / cur["kv_total"] if cur["kv_total"] else 0.0
    if "prompt_cache_hit_tokens" in cur and "prompt_cache_query_tokens" in cur:
        looked_up = cur["prompt_cache_query_tokens"] - prev.get("prompt_cache_query_tokens", 0)
        hits = cur["prompt_cache_hit_tokens"] - prev.get("prompt_cache_hit_tokens", 0)
        hit_rate = f"{100.0 * hits / looked_up:.1f}%" if looked_up else "0.0%"
    else:
        hit_rate = "n/a"
    constrained = cur.get("constrained_steps", 0) - prev.get("constrained_steps", 0)
    host = _host_time(prev, cur)
    extra = f", steps: {host}" if host else ""  # is the host keeping the device busy?
    if constrained:  # the time building allowed-token masks (grammars, token healing) per such step
        per_step_ms = 1000.0 * (cur["mask_s"] - prev.get("mask_s", 0.0)) / constrained
        extra = f", token masks: {per_step_ms:.2f} ms/step over {constrained:.0f} constrained steps"
        if "mask_wait_s" in cur:  # the engine thread's waits for the mask worker's answers
            waited_ms = 1000.0 * (cur["mask_wait_s"] - prev.get("mask_wait_s", 0.0)) / constrained
            extra += f", engine waited {waited_ms:.2f} ms/step"
        if host:
            extra += f" (all steps: {host})"
    return (
        f"prompt throughput: {rate('prefill_tokens'):.1f} tokens/s, "
        f"generation throughput: {rate('decode_tokens'):.1f} tokens/s, "
        f"running: {cur['running']:.0f} reqs, waiting: {cur['waiting']:.0f} reqs, paused: {cur['paused']:.0f} reqs, "
        f"KV cache usage: {kv_pct:.1f}%, prompt cache hit rate: {hit_rate}{extra}"
    )
