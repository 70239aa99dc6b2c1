"""Micro-benchmarks behind ``safety-monitor bench``."""
