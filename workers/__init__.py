"""Celery workers: campaigns, triage, minimization, verification."""
