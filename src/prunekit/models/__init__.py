"""Model sources, loading and family adapters."""
