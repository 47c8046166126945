"""Seed-compatible functional API (``scalablevq`` call conventions) and its visualisation."""
