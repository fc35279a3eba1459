"""What every layer of blockgraph shares: its error types, safe file reads and atomic writes, text for terminals.

The lowest layer: it imports nothing of blockgraph, and `blocks`, `builder`, `trainer` and `cli` all build on it.
"""
