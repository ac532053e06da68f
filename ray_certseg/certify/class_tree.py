"""Class hierarchies: a tree over the C fine classes, for hierarchical certification.

A hierarchy has levels 0 (the fine classes) to L. Each level is a partition of the classes into nodes, and
levels nest: every node of level l + 1 is a union of nodes of level l. It is stored as ``node[l][c]``, the
node id at level l of fine class c (``node[0]`` is the identity), node ids numbered 0.. per level in the order
the file lists them.

File format (YAML or JSON; ``ray_certseg/certify/class_trees/*.yaml`` are shipped, a user's own is accepted by path):

    name: cityscapes
    classes: [road, sidewalk, ...]                 # level 0: the dataset's classes, in train-id order
    levels:                                        # levels 1..L, each node -> the nodes of the level below
      - {flat: [road, sidewalk], construction: [building, wall, fence], ...}
      - {static: [flat, construction, ...], dynamic: [human, vehicle]}

Validated on load: every node of a level below appears exactly once in the next level (so each level is a
partition of the classes and levels nest), names are unique per level, no node is empty. Numpy only.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

SHIPPED = ("cityscapes", "pascal_context59", "demo")


@dataclass(frozen=True, eq=False)
class Hierarchy:
    """``node[l]``: (C,) int array, the level-l node of each fine class; ``names[l]``: node names of level l."""

    name: str
    names: tuple[tuple[str, ...], ...]
    node: tuple[np.ndarray, ...]

    @property
    def num_classes(self) -> int:
        return len(self.names[0])

    @property
    def num_levels(self) -> int:
        """L + 1: the fine level and the L coarser ones."""
        return len(self.node)

    def sizes(self, level: int) -> np.ndarray:
        """|classes under node| for every node of ``level``."""
        return np.bincount(self.node[level], minlength=len(self.names[level]))

    def matrix(self, level: int) -> np.ndarray:
        """(nodes, C) 0/1 matrix M with M[v, c] = 1 iff class c is under node v: node votes = M @ class votes."""
        m = np.zeros((len(self.names[level]), self.num_classes), dtype=np.int32)
        m[self.node[level], np.arange(self.num_classes)] = 1
        return m

    @cached_property
    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(node (L + 1, C): the level-l node of class c; sizes (L + 1, max nodes): |classes under node|)."""
        width = max(len(n) for n in self.names)
        sizes = np.ones((self.num_levels, width), dtype=np.int64)
        for level in range(self.num_levels):
            counts = self.sizes(level)
            sizes[level, : counts.size] = counts
        return np.stack(self.node), sizes

    def info_gain(self) -> np.ndarray:
        """(L + 1, max nodes) table: log C - log |classes under node| (0 past a level's last node)."""
        width = max(len(n) for n in self.names)
        out = np.zeros((self.num_levels, width))
        for level in range(self.num_levels):
            sizes = self.sizes(level)
            out[level, : len(sizes)] = math.log(self.num_classes) - np.log(sizes)
        return out

    @property
    def digest(self) -> str:
        """``name-<8 hex>``: the name and a hash of the tree, recorded with the votes it was counted for."""
        tree = json.dumps([n.tolist() for n in self.node])
        return f"{self.name}-{hashlib.sha256(tree.encode()).hexdigest()[:8]}"

    def to_dict(self) -> dict[str, Any]:
        levels = []
        for level in range(1, self.num_levels):
            below = self.names[level - 1]
            levels.append(
                {
                    name: [below[v] for v in range(len(below)) if self._parent(level, v) == i]
                    for i, name in enumerate(self.names[level])
                }
            )
        return {"name": self.name, "classes": list(self.names[0]), "levels": levels}

    def _parent(self, level: int, child: int) -> int:
        """The level-``level`` node of node ``child`` of level - 1."""
        c = int(np.flatnonzero(self.node[level - 1] == child)[0])
        return int(self.node[level][c])


def from_dict(data: Mapping[str, Any], where: str = "hierarchy") -> Hierarchy:
    """A validated :class:`Hierarchy` from the file format (see the module docstring)."""
    if not isinstance(data, Mapping) or set(data) - {"name", "classes", "levels"} or "classes" not in data:
        raise ValueError(
            f"{where}: expected a mapping with name, classes and levels (see docs/hierarchical.md)"
        )
    classes = [str(c) for c in data["classes"]]
    if len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"{where}: classes must be a non-empty list of distinct names")
    names: list[tuple[str, ...]] = [tuple(classes)]
    node = [np.arange(len(classes))]
    for i, level in enumerate(data.get("levels") or []):
        here = f"{where}: levels[{i}] (level {i + 1})"
        if not isinstance(level, Mapping) or not level:
            raise ValueError(f"{here}: expected a non-empty mapping node -> [nodes of level {i}]")
        below = {name: v for v, name in enumerate(names[-1])}
        parent = np.full(len(below), -1)
        for v, (name, children) in enumerate(level.items()):
            if not isinstance(children, Sequence) or isinstance(children, str) or not children:
                raise ValueError(f"{here}: node {name!r} needs a non-empty list of level-{i} nodes")
            for child in children:
                if child not in below:
                    raise ValueError(
                        f"{here}: node {name!r} names {child!r}, which is not a node of level {i}"
                    )
                if parent[below[child]] >= 0:
                    raise ValueError(f"{here}: {child!r} appears in more than one node (levels must nest)")
                parent[below[child]] = v
        missing = [n for n, v in below.items() if parent[v] < 0]
        if missing:
            raise ValueError(f"{here}: {missing} of level {i} are in no node (every class once per level)")
        names.append(tuple(str(n) for n in level))
        node.append(parent[node[-1]])
    if len(names) < 2:
        raise ValueError(f"{where}: levels is empty; a hierarchy needs at least one level above the classes")
    for array in node:
        array.flags.writeable = False
    return Hierarchy(str(data.get("name") or "hierarchy"), tuple(names), tuple(node))


def load(source: str | Path) -> Hierarchy:
    """A shipped hierarchy by name (:data:`SHIPPED`) or a YAML/JSON file by path."""
    import yaml

    if str(source) in SHIPPED:
        text = resources.files("ray_certseg.certify").joinpath(f"class_trees/{source}.yaml").read_text()
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"hierarchy {str(source)!r} is neither a shipped one {list(SHIPPED)} nor a file"
            )
        text = path.read_text()
    return from_dict(yaml.safe_load(text), where=f"hierarchy {source}")


def check_classes(hierarchy: Hierarchy, num_classes: int, class_names: Sequence[str] | None = None) -> None:
    """The hierarchy is over the dataset's classes: C classes, and the same names when the dataset has them."""
    if hierarchy.num_classes != num_classes:
        raise ValueError(
            f"hierarchy {hierarchy.name!r} has {hierarchy.num_classes} classes, the dataset {num_classes}"
        )
    if class_names and list(class_names) != list(hierarchy.names[0]):
        bad = next(i for i, (a, b) in enumerate(zip(class_names, hierarchy.names[0])) if a != b)
        raise ValueError(
            f"hierarchy {hierarchy.name!r} lists class {bad} as {hierarchy.names[0][bad]!r}, the dataset as "
            f"{class_names[bad]!r}: the hierarchy's classes must be the dataset's, in train-id order"
        )
