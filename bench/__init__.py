"""Benchmarks (see BENCHMARKS.md): webhook throughput, pipeline overhead, memory, and
generation throughput.

Each module is a command (`python -m bench.<name>`). The process benchmarks start their
own processes on loopback, use a private key prefix and queue in Redis, and clean both up
afterwards; `bench.harness` holds what they share.
"""
