"""Shared toy fixtures for tests: tiny world, tiny model, tiny tokenizer.

Each area adds its own functions here; never rewrite another area's.
"""
