"""Trainer adapters; each imports its trainer lazily."""
