"""Evaluation: loss-based metrics, the metrics registry, generation, and HumanEval in a sandbox."""
