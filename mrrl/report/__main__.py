"""``python -m mrrl.report <experiment_dir>``."""

import sys

from mrrl.report.cli import main

sys.exit(main())
