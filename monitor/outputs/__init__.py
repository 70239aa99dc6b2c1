"""Outputs of the sidecar: Prometheus metrics and Alertmanager (logging set-up is process-wide:
`monitor/logs.py`)."""
