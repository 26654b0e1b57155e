"""The gateway service (see server.py)."""
