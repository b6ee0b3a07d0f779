"""The study: its phases, preference pairs, the FLOP model, the report."""
