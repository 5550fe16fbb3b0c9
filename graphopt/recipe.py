"""TOML recipes: an ordered list of passes with their parameters, and optional verification bounds.

    [verify]
    max_error = 1e-4          # relative L2 error bound (see numerics.Tolerance)

    [[pass]]
    name = "fold_batchnorm"

    [[pass]]
    name = "remove_dead"
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from .core.errors import InputError, UsageError
from .passes.base import Pass, create

VERIFY_KEYS = {"max_error": "max_rel_l2", "max_abs_error": "max_abs", "min_cosine": "min_cosine",
               "min_agreement": "min_top1_agreement"}


def load_recipe(path: str | Path) -> tuple[list[Pass], dict]:
    """Passes in order, and the tolerance fields the recipe sets (Tolerance field name -> value)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: recipe file not found")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    unknown = set(data) - {"pass", "verify"}
    if unknown:
        raise UsageError(f"{path}: unknown sections {sorted(unknown)} (expected [[pass]] and [verify])")
    entries = data.get("pass", [])
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"{path}: a recipe needs at least one [[pass]] table")
    passes = []
    for i, entry in enumerate(entries, 1):
        params = dict(entry)
        name = params.pop("name", None)
        if not isinstance(name, str):
            raise UsageError(f"{path}: [[pass]] number {i} has no name")
        passes.append(create(name, params))
    verify = data.get("verify", {})
    bad = set(verify) - set(VERIFY_KEYS)
    if bad:
        raise UsageError(f"{path}: unknown [verify] keys {sorted(bad)} (known: {', '.join(VERIFY_KEYS)})")
    return passes, {VERIFY_KEYS[k]: v for k, v in verify.items()}
