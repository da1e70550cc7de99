"""Benchmark engines (fio-like block load, packet load) and their shared statistics."""
