"""Shared test helpers: a real-daemon runner and a small HTTP client."""
