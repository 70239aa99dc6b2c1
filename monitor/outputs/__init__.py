"""Outputs of the sidecar: metrics, logs (and later Alertmanager)."""
