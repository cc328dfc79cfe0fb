"""Measuring: headless generation, DreamBench metrics and evaluation, the speed and training-throughput
benchmarks."""
