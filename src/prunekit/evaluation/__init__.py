"""Evaluation: perplexity datasets and protocol, zero-shot accuracy, size / cost / speed, the report and plots."""
