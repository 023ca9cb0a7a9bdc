"""Names Prefect accepts, made from names users chose.

Prefect artifact keys and block names may hold only lowercase ASCII letters, digits and
dashes; experiment files may be called anything (`données ü.jsonl`). Every key or name
promptfleet gives Prefect goes through `slug`, so a file name can never fail a run after
its answers are in.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

_NOT_ALLOWED = re.compile(r"[^a-z0-9]+")


def slug(name: str, fallback: str = "experiment", distinct: bool = True) -> str:
    """`name` in lowercase letters, digits and single dashes.

    Accents are folded (é -> e) so keys stay readable. With `distinct`, a name that had to
    change gets a short hash of the original appended, so `Données` and `donnees` keep
    apart keys; a name that is already a slug is returned as it is. Without it the result
    is predictable by hand (OPENAI_API_KEY -> openai-api-key), for names users type.
    """
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    cleaned = _NOT_ALLOWED.sub("-", folded).strip("-") or fallback
    if cleaned == name or not distinct:
        return cleaned
    return f"{cleaned}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"
