"""Image ids that are stable, unique and safe as file names.

``sanitize_id``: Unicode is decomposed (NFKD) and combining marks dropped (``é`` -> ``e``); any character
outside ``[A-Za-z0-9._-]`` becomes ``_``; runs of two or more dots become ``_`` (no ``..``); leading dots
become ``_`` (no hidden files); ids longer than 160 characters are cut and given a hash suffix.
``unique_ids``: when sanitisation makes ids collide, every colliding id that sanitisation changed (or that
is duplicated) gets the suffix ``-<crc32 of its unique key>`` (the image path), so the result depends only
on the items, never on the order of listing or on the Python hash seed.
"""

from __future__ import annotations

import logging
import re
import unicodedata
import zlib
from collections import defaultdict
from collections.abc import Sequence

log = logging.getLogger("ray_certseg")
UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
MAX_LENGTH = 160


def _crc(text: str) -> str:
    return f"{zlib.crc32(text.encode('utf-8')):08x}"


def sanitize_id(raw: str) -> str:
    """A file-name-safe spelling of ``raw`` (see the module docstring); never empty."""
    text = "".join(c for c in unicodedata.normalize("NFKD", str(raw)) if not unicodedata.combining(c))
    text = UNSAFE.sub("_", text)
    text = re.sub(r"\.{2,}", "_", text)
    text = re.sub(r"^\.", "_", text) or "_"
    if len(text) > MAX_LENGTH:
        text = f"{text[: MAX_LENGTH - 9]}-{_crc(str(raw))}"
    return text


def unique_ids(raw_ids: Sequence[str], keys: Sequence[str]) -> list[str]:
    """Sanitised, unique ids for items with ids ``raw_ids`` and distinct ``keys`` (e.g. image paths).

    Raises ValueError if two items share a key (the same image listed twice) or, astronomically unlikely,
    a hash suffix collides."""
    if len(raw_ids) != len(keys):
        raise ValueError(f"unique_ids: {len(raw_ids)} ids but {len(keys)} keys")
    safe = [sanitize_id(r) for r in raw_ids]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(safe):
        groups[s].append(i)
    out = list(safe)
    for name, members in groups.items():
        if len(members) == 1:
            continue
        kept = [i for i in members if raw_ids[i] == name]
        renamed = []
        for i in members:
            if not (len(kept) == 1 and kept[0] == i):
                out[i] = f"{name}-{_crc(str(keys[i]))}"
                renamed.append(f"{raw_ids[i]!r} -> {out[i]!r}")
        log.warning(
            "image ids %s collide once made file-name safe (as %r): renamed %s",
            sorted({raw_ids[i] for i in members}),
            name,
            ", ".join(renamed),
        )
    if len(set(out)) != len(out):
        seen: dict[str, int] = {}
        for i, name in enumerate(out):
            if name in seen:
                raise ValueError(
                    f"items {keys[seen[name]]!r} and {keys[i]!r} get the same image_id {name!r}: "
                    "an image listed twice? Remove the duplicate or give explicit image_ids"
                )
            seen[name] = i
    return out
