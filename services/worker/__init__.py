"""The Celery worker (see app.py)."""
