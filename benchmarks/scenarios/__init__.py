"""Reproducible training runs that stay stable or go wrong in known ways, with the rule
that dates their divergence and a runner that records what every detector saw."""
