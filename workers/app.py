"""The farm's Celery application: a Redis broker, JSON only, late acknowledgement.

``celery -A workers.app worker -Q fuzz,triage,minimize,coverage,crosscheck`` runs a worker;
every setting comes from the environment (:class:`workers.settings.Settings`).
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from workers.settings import Settings

# A worker takes from its queues in turn (Kombu's round robin), so a slice's findings are
# triaged, and their buckets minimized, before the worker's next slice but one. Coverage
# samples, asked for from the dashboard, have a queue of their own so that a backlog of
# minimizations does not hold them up. Crosschecks (a bucket's input on QEMU + OVMF) too: only
# workers with QEMU and OVMF consume that queue, so a farm without them simply leaves its
# buckets "not run".
QUEUES = ("fuzz", "triage", "minimize", "coverage", "crosscheck")


def worker_queues(settings: Settings | None = None) -> tuple[str, ...]:
    """The queues a worker on this machine consumes by default: all, but `crosscheck` only
    where QEMU and OVMF are installed and crosschecks are on (FUZZFARM_CROSSCHECK)."""
    from kernel_emu import qemu

    settings = settings or Settings.from_env()
    if settings.crosscheck and qemu.missing() is None:
        return QUEUES
    return tuple(q for q in QUEUES if q != "crosscheck")


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings.from_env()
    app = Celery("fuzzfarm", broker=settings.redis_url, include=["workers.tasks"])
    app.conf.update(
        # JSON only: a message is never code to run
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        # a task is acknowledged when it is done, so a worker that dies loses nothing: Redis
        # hands the message out again once the visibility timeout has passed
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Kombu pings an idle connection every 25 s by default; once a minute is plenty
        broker_transport_options={"visibility_timeout": settings.visibility_timeout,
                                  "health_check_interval": 60},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name)
                     for name in QUEUES],
        task_default_queue="fuzz",
        task_default_exchange="fuzz",
        task_default_routing_key="fuzz",
        task_routes={
            "workers.tasks.fuzz_slice": {"queue": "fuzz"},
            "workers.tasks.triage": {"queue": "triage"},
            "workers.tasks.triage_many": {"queue": "triage"},
            "workers.tasks.minimize": {"queue": "minimize"},
            "workers.tasks.minimize_many": {"queue": "minimize"},
            "workers.tasks.verify": {"queue": "triage"},
            "workers.tasks.sample_coverage": {"queue": "coverage"},
            "workers.tasks.crosscheck": {"queue": "crosscheck"},
        },
        worker_hijack_root_logger=False,
        worker_max_tasks_per_child=500,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    app.conf.fuzzfarm_settings = settings
    return app


app = make_app()
