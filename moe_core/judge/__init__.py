"""Refusal judges: keyword (offline), OpenAI-compatible HTTP, HF classifier; verdicts and their accuracy."""
