"""Helpers shared by the tests, the benchmarks and the local demo: model servers, tiny models."""
