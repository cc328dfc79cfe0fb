"""The CPU-sized world and benchmark that show training teaches the adapters to use the reference."""
