"""Celery glue: thin tasks that call app.services and ml/ (see workers/tasks.py)."""
