"""GET /metrics: Prometheus text with request, batching, queue and run metrics."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def scrape(client) -> dict[str, list]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {fam.name: fam.samples for fam in text_string_to_metric_families(r.text)}


def value(samples, name: str, **labels) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_count_requests_by_route_template(client, anon_client, finished_run, digits_dataset):
    run_id = finished_run["id"]
    before = scrape(anon_client)  # /metrics is open to a local (loopback) scraper without a token
    route = "/v1/runs/{run_id}/predict"
    n_before = value(before.get("scan_http_requests", []), "scan_http_requests_total", route=route, status="200")
    png = client.get(f"/v1/datasets/{digits_dataset}/items/1.png").content
    for _ in range(2):
        assert client.post(f"/v1/runs/{run_id}/predict", files=[("files", ("a.png", png))]).status_code == 200
    after = scrape(anon_client)
    requests = after["scan_http_requests"]
    assert value(requests, "scan_http_requests_total", route=route, status="200") == n_before + 2
    # labelled by template, never by the raw path (bounded number of series)
    assert not any(run_id in s.labels.get("route", "") for s in requests)
    latency = after["scan_http_request_duration_seconds"]
    assert value(latency, "scan_http_request_duration_seconds_count", route=route) >= 2
    assert value(after["scan_predict_batch_size"], "scan_predict_batch_size_count") >= 2
    assert "scan_predict_queue_rows" in after


def test_metrics_report_runs_by_state_stage_durations_and_queue(anon_client, finished_run):
    fams = scrape(anon_client)
    assert value(fams["scan_runs"], "scan_runs", state="SUCCEEDED") >= 1
    assert {s.labels["state"] for s in fams["scan_runs"]} >= {"QUEUED", "PRETEXT", "SUCCEEDED", "FAILED"}
    # Runs waiting for a worker are the QUEUED runs, read in the same snapshot as scan_runs.
    assert value(fams["scan_queue_depth"], "scan_queue_depth", queue="runs") == value(
        fams["scan_runs"], "scan_runs", state="QUEUED"
    )
    durations = fams["scan_run_stage_duration_seconds"]
    for stage in ("pretext", "mining", "clustering", "selflabel"):
        assert value(durations, "scan_run_stage_duration_seconds_count", stage=stage) >= 1
        assert value(durations, "scan_run_stage_duration_seconds_sum", stage=stage) > 0
