"""torchmetrics ``Metric`` classes (streaming calibration errors, unlearning metrics)."""
