"""The restart proof (``bench/restarts.py``), scaled down: real HAProxy, gateways and the demo
Stratum pool's backends (``services/mining.py``, ``services/pooljobs.py``; for ``meshkit
restart``, ``mining`` under a real circusd).

The clients are Stratum v1 miners (``bench/loadclients.py``): they subscribe, authorize,
get their difficulty and jobs pushed, and submit real shares the pool judges; a rejected
share (stale, duplicate, low difficulty) counts as a failed request.

One run of every scenario under load (40 clients, 160 requests per second,
a job pushed every second; 100 clients for the rolling restart of the gateways) is
shared by the tests below; each asserts one part of the report, so a failure
names the scenario and shows its counts. The bench runs the same code at full
size (200 clients, 600 requests per second; 2,000 clients for the gateways).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCENARIOS = ("a_rolling_restart", "b_kill_all", "c_scale", "d_haproxy_reload", "e_gateway_drain",
             "f_meshkit_restart", "g_gateway_rolling")


def _restarts() -> Any:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("restarts")
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    restarts = _restarts()
    config = restarts.ProofConfig(
        clients=40, rate=4.0, request_timeout=2.5, job_interval=1.0,
        gap=3.5, settle=1.5, reloads=2, churn=10.0, gateway_grace=3.0, rolling_clients=60,
        rolling_rate=1.0, reconnect_window=1.0, reconnect_rate=40.0)
    result: dict[str, Any] = restarts.run_proof(config, str(tmp_path_factory.mktemp("proof")))
    print(restarts.format_table(result))  # shown with -s, and on failure
    return result


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_disconnect_failure_hang_or_refusal(report: dict[str, Any], scenario: str) -> None:
    counts = report["scenarios"][scenario]
    assert counts["sent"] > 0 and counts["ok"] > 0, counts
    zeros = {k: counts[k] for k in ("disconnects", "failed", "hung", "refused")}
    assert zeros == {"disconnects": 0, "failed": 0, "hung": 0, "refused": 0}, counts


def test_totals_and_rate(report: dict[str, Any]) -> None:
    assert report["client_disconnects"] == 0
    assert report["failed_requests"] == 0
    assert report["hung_requests"] == 0
    assert report["refused_connections"] == 0
    assert report["request_rate_per_s"] >= 0.8 * 40 * 4.0
    for name in ("baseline", *SCENARIOS):
        assert report["scenarios"][name]["p99_ms"] is not None


def test_timeouts_happen_only_in_the_gap_and_pushes_resume(report: dict[str, Any]) -> None:
    gap = report["scenarios"]["b_kill_all"]
    assert gap["timeouts"] > 0, "the gap was longer than the deadline: some requests must time out"
    assert gap["ok"] > gap["timeouts"]
    assert report["gap_timeouts"] == gap["timeouts"]
    assert report["checks"]["b_pushes_resumed"], gap


def test_restarted_and_removed_backends_exit_cleanly(report: dict[str, Any]) -> None:
    checks = report["checks"]
    assert checks["a_backends_exit_0"] and checks["c_removed_exit_0"]


def test_new_instances_take_traffic_within_a_second(report: dict[str, Any]) -> None:
    scale = report["scenarios"]["c_scale"]
    assert scale["scaled_up_to"] == 6 and scale["scaled_down_to"] == 2
    assert scale["first_traffic_s"] is not None and scale["first_traffic_s"] <= 1.0, scale


def test_haproxy_reloads_refuse_nothing(report: dict[str, Any]) -> None:
    reload = report["scenarios"]["d_haproxy_reload"]
    assert reload["reloads"] == 2 and reload["new_connections"] > 0
    assert reload["refused"] == 0


def test_a_draining_gateway_gets_no_new_clients_and_closes_its_own_cleanly(
    report: dict[str, Any],
) -> None:
    drain = report["scenarios"]["e_gateway_drain"]
    assert drain["exit_code"] == 0
    assert drain["misrouted_new_connections"] == 0 and drain["new_connections"] > 0
    assert drain["clients_on_stopped_gateway"] > 0
    assert drain["clean_closes"] >= drain["clients_on_stopped_gateway"]
    # Its clients moved when told (client.reconnect, in waves after the listener's second of linger).
    assert drain["drain_s"] >= 1.0
    assert report["checks"]["e_clients_closed_cleanly"]


def test_meshkit_restart_replaces_every_backend_each_registered_before_an_old_one_stops(
    report: dict[str, Any],
) -> None:
    restart = report["scenarios"]["f_meshkit_restart"]
    backends = report["config"]["backends"]
    assert restart["exit_code"] == 0, restart
    assert restart["replaced"] == backends, restart
    assert restart["min_up"] >= backends, restart  # never fewer registered backends than before
    assert restart["order_ok"], restart
    checks = report["checks"]
    assert checks["f_every_process_replaced"] and checks["f_never_fewer_up"], checks
    assert checks["f_registered_before_stopped"], checks


def test_a_rolling_restart_of_every_gateway_moves_clients_in_waves_losing_nothing(
    report: dict[str, Any],
) -> None:
    rolling = report["scenarios"]["g_gateway_rolling"]
    assert rolling["restarted"] == report["config"]["gateways"], rolling
    assert rolling["failed"] == 0 and rolling["hung"] == 0 and rolling["disconnects"] == 0, rolling
    assert rolling["errors"] == {}, rolling  # nothing lost mid-flight (no unanswered_at_close)
    assert rolling["moved"] >= rolling["clients"] and rolling["reconnects"] >= rolling["clients"], rolling
    # 40 a second at most, plus one wave (a quarter second's worth) of slack for a late read.
    assert rolling["moved_per_s_max"] <= 50 and rolling["reconnects_per_s_max"] <= 50, rolling
    checks = report["checks"]
    assert checks["g_gateways_exit_0"] and checks["g_every_client_moved"], checks
    assert checks["g_reconnects_within_rate"], checks
