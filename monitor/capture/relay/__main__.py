"""`python -m monitor.capture.relay`: the relay process (see `monitor.capture.relay.main`)."""

import os
import sys

# Before gRPC is imported: its EventEngine client runs each stream's socket reads and writes on
# a pool of threads, so every message wakes one of them and hands the result to another (the
# channel's poller) before ours. The older client path does the I/O in the threads that are
# already awake for the message: measured with `safety-monitor bench relay`, it cut the
# relay's context switches per step by a third and its CPU by a sixth at the vLLM bench's
# pace. A user's own GRPC_EXPERIMENTS is left as it is.
os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client")

from monitor.capture.relay.main import main

sys.exit(main())
