"""Calibration data readers and activation calibrators."""
