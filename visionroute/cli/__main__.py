"""``python -m visionroute.cli``: the same as the ``visionroute`` console script."""

import sys

from visionroute.cli import main

sys.exit(main())
