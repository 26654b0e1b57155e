"""The encoder service (see server.py)."""
