"""Benchmarks: numbers to report, each next to a baseline measured in the same run.

Benchmarks are not tests: they assert nothing, they measure and print.
"""
