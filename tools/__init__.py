"""Offline tools around the server: weight conversion (`python -m tools.convert`)."""
