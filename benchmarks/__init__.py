"""Speed of built models against hand-written PyTorch, printed as ratios reference / blockgraph.

Run everything with `python -m benchmarks` (or `python benchmarks/run.py`); `--quick` for fewer repeats.
Not part of the test suite. Results go to `benchmarks/RESULTS.md`.
"""
