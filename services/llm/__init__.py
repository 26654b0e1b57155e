"""The llm service (see server.py)."""
