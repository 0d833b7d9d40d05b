"""Text in: data sources by role (calibration, training, evaluation) and their tokens (stages download, calibrate)."""
