"""Helpers shared by the test modules (import as `from helpers.<module> import ...`)."""
