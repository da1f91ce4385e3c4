"""`docker stop` on the compose services stops the farm as Ctrl-C stops `fuzzfarm up`: every
service gets SIGTERM (what the farm's processes treat as Ctrl-C), a worker has time to end its
slice and report before Docker sends SIGKILL, and Redis is stopped after the services that use
it (Compose stops dependents first)."""

from __future__ import annotations

import re

from tests.deploy.compose import TEST_ENV, app_services, load

SLICE_REPORT = 30  # a slice told to stop reports within seconds; a triage batch, a few more


def _seconds(duration: str) -> float:
    total = 0.0
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration):
        total += float(value) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def test_every_service_stops_on_sigterm_with_time_to_report() -> None:
    compose = load(TEST_ENV)
    services = compose["services"]
    for name, service in services.items():
        assert service.get("stop_signal", "SIGTERM") == "SIGTERM", name
    worker = services["worker"]
    grace = _seconds(str(worker.get("stop_grace_period", "10s")))
    assert grace >= SLICE_REPORT, grace
    # the worker runs under an init that passes SIGTERM on to it (PID 1 ignores it otherwise)
    assert worker.get("init") is True
    for name in app_services(compose):
        assert "redis" in services[name].get("depends_on", {}), name
