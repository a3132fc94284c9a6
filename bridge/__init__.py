"""s2s browser bridge: websockets :8765 <-> speech daemon <-> LLM agent."""

__version__ = "0.1.0"
