"""`python -m monitor.capture.relay`: the relay process (see `monitor.capture.relay.main`)."""

import sys

from monitor.capture.relay.main import main

sys.exit(main())
