"""Measuring detection: `safety-monitor eval` and `safety-monitor rules calibrate`.

``eval`` sends labeled conversations through the real path (the capture client attached to the
model, a sidecar on a loopback port, the rules) and reports, per rule, conversation-level
recall, false-positive rate, precision and tokens to first alert, and per feature the AUROC
and recall at fixed false-positive rates of its pooled score (`evaluate.py`, `report.py`).
``rules calibrate`` replays benign conversations through the real rules engine and sets each
named threshold of the rule files for a conversation-level false-positive rate
(`calibrate.py`). Both replay conversations the way `monitor.features.build.conversations` defines,
which is also how `pack fit` fits, so fit, calibration and measurement see the same tokens.
"""
