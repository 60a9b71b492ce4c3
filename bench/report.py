"""How a bench hands over its results: JSON on stdout, and in ``--json FILE`` when given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(results: dict[str, Any], json_path: str | None) -> None:
    """Print ``results`` as indented JSON; write the same text to ``json_path`` too."""
    text = json.dumps(results, indent=2)
    print(text)
    if json_path:
        Path(json_path).write_text(text + "\n")
