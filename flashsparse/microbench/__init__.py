"""Machinery behind ``flashsparse bench``: layer-shape presets, pruning masks, timers, the copy
bandwidth probe, baselines (dense, torch.sparse CSR, 2:4 semi-structured), the sweep and its
reports (terminal table, JSON, CSV, PNG).
"""
