"""Model adapters; heavy imports stay inside functions."""
