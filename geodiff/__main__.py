"""``python -m geodiff`` (also what ``torchrun -m geodiff`` runs)."""

from __future__ import annotations

import sys

from geodiff.cli import main

sys.exit(main())
