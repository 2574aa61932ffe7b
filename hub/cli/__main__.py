"""`python -m hub.cli`: the modelhub command, as the worker supervisor and the tests start it."""

import sys

from hub.cli import main

sys.exit(main())
