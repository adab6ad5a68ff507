"""Simulators that make data with known ground truth."""
