"""`python -m hat_edge.runtime env|run|check|translate`: the runner, from an installed hat-edge."""

import sys

from .job import apply_job_env

apply_job_env(sys.argv[1:])  # before numpy is imported
from .runner import main  # noqa: E402

sys.exit(main())
