"""Tracking: the event log, metrics.ndjson, and the sinks fed from it (MLflow, TensorBoard, W&B)."""
