"""Calibration: ACT head selection (a one-head-at-a-time sweep) and per-head temperature scaling."""
