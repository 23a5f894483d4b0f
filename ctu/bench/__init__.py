"""Benchmarks behind `python -m launch.bench NAME --out=FILE.json`."""
