"""Callbacks that act on instability events: learning-rate backoff, staged training, rollback."""
