"""`python -m hat_edge.runtime env|run|check|translate`: the runner, from an installed hat-edge."""

import sys

from .runner import main

sys.exit(main())
