"""Task tests reuse the engine's helpers (tiny configs, composition)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))  # engine_helpers
