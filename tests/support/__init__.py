"""Test servers and test data shared by the integration tests and the benchmarks.

Nothing here imports pytest: ``bench/`` uses these modules directly.
"""
