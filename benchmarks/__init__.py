"""Benchmarks of the loss against its peers (run ``python -m benchmarks.bench_loss --help``)."""
