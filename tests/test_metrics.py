"""Prometheus metrics (names, types, buckets as LightLLM's dashboards expect), pushing to a real HTTP push-gateway
stand-in on a loopback port, and the periodic stats line."""

import base64
import http.server
import logging
import threading
import time

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jaxllm.args import parse_args
from jaxllm.metrics import (
    DURATION_BUCKETS, Metrics, MetricsPusher, StatsLogger, format_stats, length_buckets, parse_grouping_key,
)

COUNTERS = ["lightllm_request_count", "lightllm_request_success", "lightllm_request_failure",
            "lightllm_batch_inference_count", "lightllm_prompt_cache_hit_tokens",
            "lightllm_prompt_cache_prompt_tokens"]
HISTOGRAMS = ["lightllm_request_duration", "lightllm_request_validation_duration",
              "lightllm_request_inference_duration", "lightllm_request_mean_time_per_token_duration",
              "lightllm_request_first_token_duration", "lightllm_request_input_length",
              "lightllm_request_generated_tokens", "lightllm_request_max_new_tokens", "lightllm_request_queue_duration",
              "lightllm_batch_inference_duration", "lightllm_batch_next_size", "lightllm_cache_length",
              "lightllm_cache_ratio"]
GAUGES = ["lightllm_queue_size", "lightllm_batch_current_size", "lightllm_batch_pause_size",
          "lightllm_batch_current_max_tokens"]


def families(metrics: Metrics) -> dict:
    body, _ = metrics.render()
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def bucket_bounds(metrics: Metrics, name: str, **labels) -> list[float]:
    fam = families(metrics)[name]
    return [float(s.labels["le"]) for s in fam.samples
            if s.name == name + "_bucket" and all(s.labels.get(k) == v for k, v in labels.items())]


def value(metrics: Metrics, sample: str, **labels) -> float:
    return metrics.registry.get_sample_value(sample, labels)


# ---------------------------------------------------------------- names, types, buckets


def test_every_metric_has_its_name_and_type():
    fams = families(Metrics(max_req_input_len=2048, max_req_total_len=3072))
    assert {n: fams[n].type for n in COUNTERS} == dict.fromkeys(COUNTERS, "counter")
    assert {n: fams[n].type for n in HISTOGRAMS} == dict.fromkeys(HISTOGRAMS, "histogram")
    assert {n: fams[n].type for n in GAUGES} == dict.fromkeys(GAUGES, "gauge")


def test_buckets_follow_lightllm():
    m = Metrics(max_req_input_len=2000, max_req_total_len=3000)
    inf = float("inf")
    durations = bucket_bounds(m, "lightllm_request_duration")
    assert len(durations) == 36 and durations[-1] == inf
    assert durations[0] == pytest.approx(0.0015) and durations[34] == pytest.approx(0.001 * 1.5**35)
    assert bucket_bounds(m, "lightllm_batch_inference_duration", method="decode") == list(DURATION_BUCKETS) + [inf]
    assert bucket_bounds(m, "lightllm_request_input_length") == [20.0 * k for k in range(1, 101)] + [inf]
    assert bucket_bounds(m, "lightllm_cache_length") == [20.0 * k for k in range(1, 101)] + [inf]
    for name in ("lightllm_request_generated_tokens", "lightllm_request_max_new_tokens"):
        assert bucket_bounds(m, name) == [30.0 * k for k in range(1, 101)] + [inf]
    assert bucket_bounds(m, "lightllm_batch_next_size") == [float(n) for n in range(1, 129)] + [inf]
    assert bucket_bounds(m, "lightllm_cache_ratio") == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, inf]
    assert length_buckets(2048)[0] == 20.48 and length_buckets(2048)[-1] == 2048


def test_method_labels_exist_from_the_start():
    m = Metrics(100, 200)
    for method in ("prefill", "decode"):
        assert value(m, "lightllm_batch_inference_count_total", method=method) == 0
        assert value(m, "lightllm_batch_inference_duration_count", method=method) == 0


def test_registries_are_separate_and_not_global():
    a, b = Metrics(100, 200), Metrics(100, 200)
    a.request_received()
    assert value(a, "lightllm_request_count_total") == 1
    assert value(b, "lightllm_request_count_total") == 0
    assert prometheus_client.REGISTRY.get_sample_value("lightllm_request_count_total") is None


# ---------------------------------------------------------------- recording


def test_successful_request():
    m = Metrics(1000, 2000)
    m.request_received()
    m.request_finished(success=True, duration_s=2.5, validation_s=0.01, inference_s=2.4, queue_s=0.05,
                       first_token_s=0.41, input_len=120, generated_tokens=60, max_new_tokens=64)
    assert value(m, "lightllm_request_count_total") == 1
    assert value(m, "lightllm_request_success_total") == 1
    assert value(m, "lightllm_request_failure_total") == 0
    for name, total in [("lightllm_request_duration", 2.5), ("lightllm_request_validation_duration", 0.01),
                        ("lightllm_request_inference_duration", 2.4), ("lightllm_request_queue_duration", 0.05),
                        ("lightllm_request_first_token_duration", 0.41), ("lightllm_request_input_length", 120),
                        ("lightllm_request_generated_tokens", 60), ("lightllm_request_max_new_tokens", 64)]:
        assert value(m, name + "_count") == 1, name
        assert value(m, name + "_sum") == pytest.approx(total), name
    # last token at 0.01 + 2.4 s after arrival, first at 0.41 s: 2.0 s over 60 tokens
    assert value(m, "lightllm_request_mean_time_per_token_duration_sum") == pytest.approx(2.0 / 60)
    assert value(m, "lightllm_request_input_length_bucket", le="110.0") == 0
    assert value(m, "lightllm_request_input_length_bucket", le="120.0") == 1


def test_failed_request_counts_only_failure_and_duration():
    m = Metrics(1000, 2000)
    m.request_received()
    m.request_finished(success=False, duration_s=0.003, validation_s=0.003, inference_s=0.0, queue_s=0.0,
                       first_token_s=0.0, input_len=0, generated_tokens=0, max_new_tokens=0)
    assert value(m, "lightllm_request_failure_total") == 1
    assert value(m, "lightllm_request_success_total") == 0
    assert value(m, "lightllm_request_duration_count") == 1
    assert value(m, "lightllm_request_input_length_count") == 0
    assert value(m, "lightllm_request_mean_time_per_token_duration_count") == 0


def test_batch_steps():
    m = Metrics(1000, 2000)
    m.batch_step("prefill", 0.120, batch_size=5)
    m.batch_step("decode", 0.010, batch_size=5)
    m.batch_step("decode", 0.012, batch_size=4)
    assert value(m, "lightllm_batch_inference_count_total", method="prefill") == 1
    assert value(m, "lightllm_batch_inference_count_total", method="decode") == 2
    assert value(m, "lightllm_batch_inference_duration_sum", method="decode") == pytest.approx(0.022)
    assert value(m, "lightllm_batch_next_size_count") == 1
    assert value(m, "lightllm_batch_next_size_bucket", le="4.0") == 0
    assert value(m, "lightllm_batch_next_size_bucket", le="5.0") == 1
    with pytest.raises(ValueError, match="'verify'"):
        m.batch_step("verify", 0.01, batch_size=1)


def test_load_gauges():
    m = Metrics(1000, 2000)
    m.set_load(queue_size=7, running=12, paused=2, max_tokens=5400)
    m.set_load(queue_size=3, running=16, paused=0, max_tokens=6000)
    assert [value(m, n) for n in GAUGES] == [3, 16, 0, 6000]


def test_prompt_cache():
    m = Metrics(1000, 2000)
    m.prompt_cache(hit_tokens=300, prompt_tokens=400)
    m.prompt_cache(hit_tokens=0, prompt_tokens=100)
    assert value(m, "lightllm_cache_length_sum") == 300 and value(m, "lightllm_cache_length_count") == 2
    assert value(m, "lightllm_cache_ratio_bucket", le="0.0") == 1
    assert value(m, "lightllm_cache_ratio_bucket", le="0.7") == 1
    assert value(m, "lightllm_cache_ratio_bucket", le="0.8") == 2
    assert value(m, "lightllm_prompt_cache_hit_tokens_total") == 300
    assert value(m, "lightllm_prompt_cache_prompt_tokens_total") == 500
    with pytest.raises(ValueError):
        m.prompt_cache(hit_tokens=5, prompt_tokens=4)


def test_render_for_prometheus_and_openmetrics():
    m = Metrics(1000, 2000)
    m.request_received()
    body, content_type = m.render()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert b"lightllm_request_count_total 1.0" in body
    body, content_type = m.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")


def test_from_args():
    args = parse_args(["--max_req_input_len", "1000", "--max_req_total_len", "1500"])
    m = Metrics.from_args(args)
    assert bucket_bounds(m, "lightllm_request_input_length")[-2] == 1000
    assert bucket_bounds(m, "lightllm_request_generated_tokens")[-2] == 1500


# ---------------------------------------------------------------- push gateway


class Gateway:
    """A push gateway stand-in: a real HTTP server on a loopback port that records each PUT/POST and answers
    with the next scripted status (200 when the script runs out)."""

    def __init__(self, statuses=()):
        self.requests, self.statuses = [], list(statuses)
        self.received = threading.Event()
        gateway = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _record(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                gateway.requests.append({"method": self.command, "path": self.path,
                                         "headers": dict(self.headers), "body": body})
                status = gateway.statuses.pop(0) if gateway.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                gateway.received.set()

            do_PUT = do_POST = _record

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def wait_for(self, n, timeout_s=10.0):
        deadline = time.monotonic() + timeout_s
        while len(self.requests) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.requests) >= n, self.requests

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gateway():
    gw = Gateway()
    yield gw
    gw.close()


def test_push_puts_the_registry_under_job_and_grouping_key(gateway):
    m = Metrics(1000, 2000)
    m.request_received()
    pusher = MetricsPusher(m.registry, gateway.address, job="jaxllm_test", interval_s=30,
                           grouping_key=["instance=node-1", "zone=eu"])
    pusher.push()
    (req,) = gateway.requests
    assert req["method"] == "PUT"
    assert req["path"] == "/metrics/job/jaxllm_test/instance/node-1/zone/eu"
    assert "Authorization" not in req["headers"]
    assert b"lightllm_request_count_total 1.0" in req["body"]


def test_push_with_basic_auth(gateway):
    m = Metrics(1000, 2000)
    pusher = MetricsPusher(m.registry, gateway.address, job="j", auth=True,
                           environ={"USERNAME": "monitor", "PASSWORD": "s3cret"})
    pusher.push()
    expected = "Basic " + base64.b64encode(b"monitor:s3cret").decode()
    assert gateway.requests[0]["headers"]["Authorization"] == expected


def test_auth_without_credentials_fails_at_construction():
    registry = Metrics(1000, 2000).registry
    with pytest.raises(ValueError, match="PASSWORD not set"):
        MetricsPusher(registry, "127.0.0.1:9", auth=True, environ={"USERNAME": "monitor"})
    with pytest.raises(ValueError, match="USERNAME and PASSWORD not set"):
        MetricsPusher(registry, "127.0.0.1:9", auth=True, environ={})
    with pytest.raises(ValueError, match="key=value"):
        MetricsPusher(registry, "127.0.0.1:9", grouping_key=["novalue"])


def test_pusher_thread_retries_after_a_failed_push(caplog):
    gw = Gateway(statuses=[500])
    try:
        m = Metrics(1000, 2000)
        pusher = MetricsPusher(m.registry, gw.address, job="retry", interval_s=0.05)
        with caplog.at_level(logging.INFO, logger="jaxllm.metrics"):
            pusher.start()
            gw.wait_for(3)
            pusher.stop()
        assert pusher.failures == 1 and pusher.pushes >= 2
        assert not pusher.running
        messages = [r.getMessage() for r in caplog.records if r.name == "jaxllm.metrics"]
        assert any("failed" in msg and "retrying" in msg for msg in messages)
        assert any("works again" in msg for msg in messages)
        assert all(r["path"] == "/metrics/job/retry" for r in gw.requests)
    finally:
        gw.close()


def test_pusher_from_args(gateway, monkeypatch):
    monkeypatch.setenv("USERNAME", "u")
    monkeypatch.setenv("PASSWORD", "p")
    args = parse_args(["--metric_gateway", gateway.address, "--job_name", "flags", "--grouping_key", "host=a",
                       "--push_interval", "3", "--enable_monitor_auth"])
    pusher = MetricsPusher.from_args(args, Metrics.from_args(args).registry)
    assert pusher.interval_s == 3
    pusher.push()
    assert gateway.requests[0]["path"] == "/metrics/job/flags/host/a"
    assert gateway.requests[0]["headers"]["Authorization"] == "Basic " + base64.b64encode(b"u:p").decode()
    assert MetricsPusher.from_args(parse_args([]), Metrics(10, 20).registry) is None
    assert parse_grouping_key({"a": 1}) == {"a": "1"}


# ---------------------------------------------------------------- stats log line


def engine_stats(**overrides):
    stats = {"running": 3, "waiting": 1, "paused": 0, "kv_used": 1500, "kv_total": 6000,
             "prefill_tokens": 0, "decode_tokens": 0}
    stats.update(overrides)
    return stats


def test_format_stats():
    prev = engine_stats(prefill_tokens=1000, decode_tokens=200, prompt_cache_hit_tokens=100,
                        prompt_cache_query_tokens=800)
    cur = engine_stats(prefill_tokens=3000, decode_tokens=700, prompt_cache_hit_tokens=400,
                       prompt_cache_query_tokens=1800)
    assert format_stats(prev, cur, 10.0) == (
        "prompt throughput: 200.0 tokens/s, generation throughput: 50.0 tokens/s, "
        "running: 3 reqs, waiting: 1 reqs, paused: 0 reqs, KV cache usage: 25.0%, prompt cache hit rate: 30.0%"
    )
    assert format_stats({}, engine_stats(kv_total=0), 1.0).endswith("KV cache usage: 0.0%, prompt cache hit rate: n/a")
    with pytest.raises(KeyError):
        format_stats({}, {"running": 1}, 1.0)


def test_stats_logger_rates_between_lines_and_metrics_hit_rate():
    now = [100.0]
    counters = {"prefill_tokens": 0, "decode_tokens": 0}
    m = Metrics(1000, 2000)
    stats = StatsLogger(lambda: engine_stats(**counters), interval_s=5, metrics=m, clock=lambda: now[0])
    now[0], counters["prefill_tokens"], counters["decode_tokens"] = 105.0, 500, 100
    m.prompt_cache(hit_tokens=50, prompt_tokens=200)
    line = stats.log_once()
    assert "prompt throughput: 100.0 tokens/s, generation throughput: 20.0 tokens/s" in line
    assert line.endswith("prompt cache hit rate: 25.0%")
    now[0], counters["decode_tokens"] = 107.0, 120
    line = stats.log_once()
    assert "prompt throughput: 0.0 tokens/s, generation throughput: 10.0 tokens/s" in line
    assert line.endswith("prompt cache hit rate: 0.0%")


def test_stats_logger_thread_logs_every_interval(caplog):
    calls = []

    def stats():
        calls.append(time.monotonic())
        return engine_stats(decode_tokens=10 * len(calls))

    logger = StatsLogger(stats, interval_s=0.05)
    with caplog.at_level(logging.INFO, logger="jaxllm.metrics"):
        logger.start()
        assert logger.running
        deadline = time.monotonic() + 10
        while len(calls) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        logger.stop()
    assert not logger.running
    lines = [r.getMessage() for r in caplog.records if r.name == "jaxllm.metrics"]
    assert len(lines) >= 3 and all(line.startswith("prompt throughput:") for line in lines)
    assert StatsLogger.from_args(parse_args(["--disable_log_stats"]), stats) is None
    assert StatsLogger.from_args(parse_args(["--log_stats_interval", "7"]), stats).interval_s == 7


def test_format_stats_constrained_steps_report_masks_and_host_time():
    prev = engine_stats(constrained_steps=10, mask_s=0.01, steps=20, host_s=0.1, steps_after_idle=2, mask_wait_s=0.002)
    cur = engine_stats(constrained_steps=30, mask_s=0.05, steps=60, host_s=0.3, steps_after_idle=12, mask_wait_s=0.012)
    line = format_stats(prev, cur, 5.0)
    assert line.endswith("token masks: 2.00 ms/step over 20 constrained steps, engine waited 0.50 ms/step"
                         " (all steps: host 5.00 ms/step, 25% launched on an idle device)")
    # With the host's parts (the engine's counters): where a constrained step's host time goes.
    phases = dict(schedule_s=(0.01, 0.03), dispatch_s=(0.02, 0.06), postprocess_s=(0.03, 0.07),
                  launch_s=(0.05, 0.13), device_wait_s=(0.1, 0.3))
    prev.update({k: a for k, (a, _) in phases.items()})
    cur.update({k: b for k, (_, b) in phases.items()})
    assert format_stats(prev, cur, 5.0).endswith(
        "(all steps: host 5.00 ms/step [schedule 0.50, dispatch 1.00, postprocess 1.00], launch 2.00, "
        "device wait 5.00, 25% launched on an idle device)")


def test_format_stats_free_steps_report_host_time():
    prev = engine_stats(steps=20, host_s=0.1, steps_after_idle=2, launch_s=0.05, device_wait_s=0.1)
    cur = engine_stats(steps=60, host_s=0.3, steps_after_idle=6, launch_s=0.13, device_wait_s=0.3)
    assert format_stats(prev, cur, 5.0).endswith(
        "prompt cache hit rate: n/a, steps: host 5.00 ms/step, launch 2.00, device wait 5.00, "
        "10% launched on an idle device")
