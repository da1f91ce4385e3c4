"""`python -m workers.redis_guard -- SERVER COMMAND…`: the Redis server of `fuzzfarm up`, stopped
last. The guard starts the server and, when asked to stop (SIGTERM, SIGINT or SIGHUP, and the
SIGTERM the kernel sends it when `fuzzfarm up` dies, even by SIGKILL), waits until the farm's
workers and controller have closed their connections — workers finishing their slices'
reports — before it stops the server, which then writes its AOF. So the order of a stop is the
same whichever way the farm is stopped: slices, workers, controller, dashboard, Redis. Other
clients (`fuzzfarm status`, a script reading the store) have nothing to finish and are not
waited for: the farm's connections are named by role (workers/store/connection.py).

The Redis URL (with its password, if any) comes from REDIS_URL, as for every farm process.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time

from workers.store import FarmStore, StoreError

log = logging.getLogger("fuzzfarm.redis-guard")

PR_SET_PDEATHSIG = 1
# the longest the guard waits for the farm's clients to go: a slice told to stop reports
# within seconds, a worker then exits
CLIENTS_WAIT = float(os.environ.get("FUZZFARM_REDIS_STOP_WAIT", "60"))
# the connections that may have a report to finish
REPORTING = ("worker", "controller")
SERVER_STOP = 30.0  # a server writing a large AOF


def _server_dies_with_guard() -> None:
    # if the guard itself is killed outright, the server still stops cleanly
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_for_clients_to_leave(url: str, timeout: float) -> int:
    """Until the server has no worker or controller connection, or `timeout` seconds; the
    ones left."""
    store = FarmStore.connect(url, "guard")
    deadline = time.monotonic() + timeout
    others = -1
    try:
        while time.monotonic() < deadline:
            try:
                others = store.clients(REPORTING)
            except StoreError:
                return 0  # the server is gone already
            if others <= 0:
                return 0
            time.sleep(0.2)
        return others
    finally:
        store.close()


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s redis-guard %(message)s")
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print("usage: python -m workers.redis_guard -- SERVER COMMAND...", file=sys.stderr)
        return 2
    command = argv[argv.index("--") + 1:]
    url = os.environ.get("REDIS_URL", "")
    stop_asked: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop_asked.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    server = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                              preexec_fn=_server_dies_with_guard)
    while server.poll() is None and not stop_asked:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=0.2)
    if server.poll() is not None:
        return server.returncode or 0
    log.info("stop asked (signal %d): waiting for the farm's clients to leave", stop_asked[0])
    left = wait_for_clients_to_leave(url, CLIENTS_WAIT) if url else 0
    if left:
        log.warning("%d worker or controller connection(s) still open after %.0f s; stopping "
                    "anyway", left, CLIENTS_WAIT)
    server.terminate()  # SIGTERM: the server writes its AOF and exits
    try:
        return server.wait(timeout=SERVER_STOP) or 0
    except subprocess.TimeoutExpired:
        server.kill()
        return server.wait() or 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
