"""Domain functions called by both the HTTP routes and the Celery tasks (never the other way round)."""
