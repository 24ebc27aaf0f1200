"""The serving metrics registry: exact Prometheus text exposition, label checks, thread safety."""

from __future__ import annotations

import math
import threading

import pytest

from distinfer.serving.metrics import SHED_REASONS, Registry, ServerMetrics


def test_counter_renders_exactly() -> None:
    r = Registry()
    c = r.counter("jobs_total", "Jobs done.", ("kind", "status"))
    c.inc(kind="a", status="200")
    c.inc(2.5, kind="a", status="200")
    c.inc(kind="b", status="500")
    assert r.render() == (
        "# HELP jobs_total Jobs done.\n"
        "# TYPE jobs_total counter\n"
        'jobs_total{kind="a",status="200"} 3.5\n'
        'jobs_total{kind="b",status="500"} 1.0\n'
    )
    assert c.get(kind="a", status="200") == 3.5
    assert c.get(kind="z", status="200") == 0.0


def test_gauge_renders_exactly() -> None:
    r = Registry()
    g = r.gauge("temp", "Temperature.", ("room",))
    g.set(21.5, room="kitchen")
    g.set(3, room="cellar")
    g.set(-1, room="cellar")
    g.inc(2, room="kitchen")
    g.dec(0.5, room="kitchen")
    assert r.render() == (
        "# HELP temp Temperature.\n"
        "# TYPE temp gauge\n"
        'temp{room="kitchen"} 23.0\n'
        'temp{room="cellar"} -1.0\n'
    )


def test_histogram_renders_cumulative_buckets_sum_and_count() -> None:
    r = Registry()
    h = r.histogram("lat_seconds", "Latency.", [0.1, 0.5, 1], ("model",))
    for v in (0.05, 0.1, 0.3, 0.7, 2.0):  # 0.1 lands in le="0.1": bounds are inclusive
        h.observe(v, model="m")
    h.observe(0.2, model="n")
    assert r.render() == (
        "# HELP lat_seconds Latency.\n"
        "# TYPE lat_seconds histogram\n"
        'lat_seconds_bucket{model="m",le="0.1"} 2\n'
        'lat_seconds_bucket{model="m",le="0.5"} 3\n'
        'lat_seconds_bucket{model="m",le="1.0"} 4\n'
        'lat_seconds_bucket{model="m",le="+Inf"} 5\n'
        f'lat_seconds_sum{{model="m"}} {0.05 + 0.1 + 0.3 + 0.7 + 2.0!r}\n'
        'lat_seconds_count{model="m"} 5\n'
        'lat_seconds_bucket{model="n",le="0.1"} 0\n'
        'lat_seconds_bucket{model="n",le="0.5"} 1\n'
        'lat_seconds_bucket{model="n",le="1.0"} 1\n'
        'lat_seconds_bucket{model="n",le="+Inf"} 1\n'
        'lat_seconds_sum{model="n"} 0.2\n'
        'lat_seconds_count{model="n"} 1\n'
    )
    assert h.count(model="m") == 5
    assert h.buckets == (0.1, 0.5, 1.0, math.inf)


def test_unlabelled_metrics_render_a_zero_sample_before_any_update() -> None:
    r = Registry()
    r.counter("c_total", "C.")
    r.gauge("g", "G.")
    r.histogram("h", "H.", [1.0])
    r.counter("labelled_total", "L.", ("x",))
    assert r.render() == (
        "# HELP c_total C.\n# TYPE c_total counter\nc_total 0.0\n"
        "# HELP g G.\n# TYPE g gauge\ng 0.0\n"
        '# HELP h H.\n# TYPE h histogram\nh_bucket{le="1.0"} 0\nh_bucket{le="+Inf"} 0\nh_sum 0.0\nh_count 0\n'
        "# HELP labelled_total L.\n# TYPE labelled_total counter\n"
    )


def test_label_values_and_help_are_escaped() -> None:
    r = Registry()
    c = r.counter("esc_total", 'Help with \\ and\nnewline and "quotes".', ("v",))
    c.inc(v='back\\slash "quoted"\nnext line')
    assert r.render() == (
        '# HELP esc_total Help with \\\\ and\\nnewline and "quotes".\n'
        "# TYPE esc_total counter\n"
        'esc_total{v="back\\\\slash \\"quoted\\"\\nnext line"} 1.0\n'
    )


def test_special_values_render_as_prometheus_writes_them() -> None:
    r = Registry()
    g = r.gauge("g", "G.", ("k",))
    g.set(math.inf, k="a")
    g.set(-math.inf, k="b")
    g.set(math.nan, k="c")
    assert r.render().splitlines()[2:] == ['g{k="a"} +Inf', 'g{k="b"} -Inf', 'g{k="c"} NaN']


def test_wrong_labels_raise_and_name_the_labels() -> None:
    r = Registry()
    c = r.counter("req_total", "R.", ("model", "status"))
    with pytest.raises(ValueError, match=r"req_total: missing label\(s\) status"):
        c.inc(model="m")
    with pytest.raises(ValueError, match=r"unexpected label\(s\) code"):
        c.inc(model="m", status="200", code="x")
    with pytest.raises(ValueError, match=r"missing label\(s\) model.*declared: model, status"):
        c.inc(status="200")
    g = r.gauge("plain", "P.")
    with pytest.raises(ValueError, match=r"plain: unexpected label\(s\) x \(declared: none\)"):
        g.set(1, x="1")
    h = r.histogram("h", "H.", [1], ("model",))
    with pytest.raises(ValueError, match="missing"):
        h.observe(1.0)
    assert "req_total{" not in r.render()  # nothing was recorded by the failed calls


def test_bad_definitions_raise() -> None:
    r = Registry()
    r.counter("dup_total", "D.")
    with pytest.raises(ValueError, match="already registered"):
        r.gauge("dup_total", "D.")
    with pytest.raises(ValueError, match="invalid metric name"):
        r.counter("bad-name", "B.")
    with pytest.raises(ValueError, match="invalid label name"):
        r.counter("x_total", "X.", ("bad-label",))
    with pytest.raises(ValueError, match="reserved"):
        r.histogram("h1", "H.", [1], ("le",))
    with pytest.raises(ValueError, match="strictly increasing"):
        r.histogram("h2", "H.", [1, 1])
    with pytest.raises(ValueError, match="at least one"):
        r.histogram("h3", "H.", [math.inf])
    with pytest.raises(ValueError, match="only goes up"):
        r.counter("up_total", "U.").inc(-1)


def test_concurrent_updates_are_not_lost() -> None:
    m = ServerMetrics()
    n, threads = 5000, 4

    def work(i: int) -> None:
        for _ in range(n):
            m.replica_busy.inc(0.5, replica=str(i % 2))
            m.latency.observe(0.01, model="minilm")

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert m.replica_busy.get(replica="0") + m.replica_busy.get(replica="1") == n * threads * 0.5
    assert m.latency.count(model="minilm") == n * threads


def _exercised_server_metrics() -> ServerMetrics:
    m = ServerMetrics()
    m.requests.inc(model="minilm", route="/v2/models/minilm/infer", status="200")
    m.requests.inc(model="minilm", route="/v2/models/minilm/infer", status="429")
    m.latency.observe(0.012, model="minilm")
    m.latency.observe(0.7, model="minilm")
    m.queue_time.observe(0.003, model="minilm")
    m.batch_size.observe(16, model="minilm")
    for reason in SHED_REASONS:
        m.shed.inc(model="minilm", reason=reason)
    m.replica_busy.inc(0.25, replica="0")
    m.replicas_ready.set(2)
    m.queue_depth.set(7)
    return m


def test_server_metrics_names_and_labels() -> None:
    text = _exercised_server_metrics().render()
    for line in (
        "# TYPE distinfer_requests_total counter",
        'distinfer_requests_total{model="minilm",route="/v2/models/minilm/infer",status="429"} 1.0',
        'distinfer_request_latency_seconds_bucket{model="minilm",le="0.005"} 0',
        'distinfer_request_latency_seconds_bucket{model="minilm",le="10.0"} 2',
        'distinfer_request_latency_seconds_count{model="minilm"} 2',
        'distinfer_batch_size_bucket{model="minilm",le="256.0"} 1',
        'distinfer_shed_requests_total{model="minilm",reason="queue_full"} 1.0',
        'distinfer_replica_busy_seconds_total{replica="0"} 0.25',
        "distinfer_replicas_ready 2.0",
        "distinfer_queue_rows 7.0",
        "# TYPE distinfer_queue_time_seconds histogram",
    ):
        assert line in text.splitlines()
    fresh = ServerMetrics().render()
    assert "distinfer_replicas_ready 0.0" in fresh.splitlines()
    assert "# TYPE distinfer_shed_requests_total counter" in fresh


def test_server_metrics_parse_as_valid_exposition_format() -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    families = {f.name: f for f in parser.text_string_to_metric_families(_exercised_server_metrics().render())}
    # the parser names counter families without the _total suffix
    assert set(families) == {
        "distinfer_requests", "distinfer_request_latency_seconds", "distinfer_queue_time_seconds",
        "distinfer_batch_size", "distinfer_shed_requests", "distinfer_replica_busy_seconds",
        "distinfer_replicas_ready", "distinfer_queue_rows",
        # text generation
        "distinfer_time_to_first_token_seconds", "distinfer_time_per_output_token_seconds",
        "distinfer_e2e_request_latency_seconds", "distinfer_generation_tokens", "distinfer_prompt_tokens",
        "distinfer_waiting_sequences", "distinfer_running_sequences", "distinfer_replica_waiting_sequences",
        "distinfer_kv_cache_usage_ratio", "distinfer_preemptions",
    }
    assert families["distinfer_requests"].type == "counter"
    assert families["distinfer_request_latency_seconds"].type == "histogram"
    assert families["distinfer_replicas_ready"].type == "gauge"
    latency = {
        (s.name, s.labels.get("le")): s.value for s in families["distinfer_request_latency_seconds"].samples
    }
    assert latency[("distinfer_request_latency_seconds_bucket", "0.025")] == 1
    assert latency[("distinfer_request_latency_seconds_bucket", "+Inf")] == 2
    assert latency[("distinfer_request_latency_seconds_sum", None)] == pytest.approx(0.712)
    shed = {s.labels["reason"]: s.value for s in families["distinfer_shed_requests"].samples}
    assert shed == dict.fromkeys(SHED_REASONS, 1.0)
    # escaped label values survive a round trip through the reference parser
    r = Registry()
    r.counter("esc_total", "E.", ("v",)).inc(v='a\\b "c"\nd')
    (family,) = parser.text_string_to_metric_families(r.render())
    assert family.samples[0].labels == {"v": 'a\\b "c"\nd'}
