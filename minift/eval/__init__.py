"""Evaluation: generation, scoring an evaluation run, comparing two runs."""
