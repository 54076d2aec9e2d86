"""Domain functions called by both the HTTP routes and the Celery tasks (never the other way round)."""

# Every process that changes a run or a job goes through these services: importing the webhooks
# module here installs its before_flush hook (the outbox of state-change deliveries) in all of them.
from app.services import webhooks as _webhooks  # noqa: F401
