"""The loopback IMDSv2 server lives in health/imds_loopback.py (drills use it too); the tests keep
importing it from here, and ``python tests/health/imds_server.py ...`` still serves."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from health.imds_loopback import ImdsServer, main  # noqa: E402

__all__ = ["ImdsServer", "main"]

if __name__ == "__main__":
    sys.exit(main())
