"""``python -m refusal_eval`` (and ``torchrun ... -m refusal_eval run ...``): the ``refusal-eval`` command."""

import sys

from refusal_eval.cli import main

sys.exit(main())
