"""Shared test harness: a quiet CPU trainer, DDP runner, naive references, dtype tolerances, resume and loss checks."""
