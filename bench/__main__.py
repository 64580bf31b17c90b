"""`python -m bench [--quick]`: see bench/run.py and docs/performance.md; `--production`: bench/production.py;
`--fleet`: bench/fleet.py."""

import sys

from bench.run import main

sys.exit(main())
