"""Evaluation harness: metrics with update/compute/reset, slicing, cost-accuracy frontiers,
trace replay, a regression gate and reports (Markdown + JSON + PNG)."""
