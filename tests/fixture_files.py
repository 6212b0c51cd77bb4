"""Helpers for the tests that read the small annotation fixtures under tests/fixtures/."""

from __future__ import annotations

import json
import os


def edited_json(source: str, tmp_path, edit) -> str:
    """A copy of the JSON file ``source`` in ``tmp_path`` after ``edit(data)`` changed it in place."""
    data = json.load(open(source))
    edit(data)
    path = tmp_path / os.path.basename(source)
    path.write_text(json.dumps(data))
    return str(path)
