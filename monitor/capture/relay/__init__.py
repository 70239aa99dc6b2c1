"""The relay process: reads steps off the shared ring and streams them to the sidecar over
gRPC (`sender.py`); `main.py` is its entry point (`python -m monitor.capture.relay`). Nothing
here imports torch: tests/unit/test_architecture.py starts it in a fresh interpreter to check.
"""
