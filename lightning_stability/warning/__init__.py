"""The meta-state of a run: readings -> low-dimensional state -> deviation -> events."""
