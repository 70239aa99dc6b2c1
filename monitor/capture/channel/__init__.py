"""The channel between the serving process and the relay process: the shared-memory ring
(`ring.py`), the frame format on it (`frames.py`) and the relay's settings and event pipe
(`protocol.py`). Imported by both processes, so nothing here loads torch when the relay
imports it (the frame writer, which only the serving process builds, imports torch then).
"""
