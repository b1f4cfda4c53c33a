"""Decisions (pure functions), cost and budgets, and the review queue (the only I/O here)."""
