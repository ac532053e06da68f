"""The job's row counter: a Ray actor class in a module of its own, so that its worker imports nothing else."""

from __future__ import annotations


class RowCounter:
    """Rows finished by the sampling actors (sampled or failed), as they finish: a Ray actor of no CPU that the
    actors add to and the driver's progress line reads, so the count moves before any vote file lands (a
    file holds many rows). Rows of an actor lost before its file was written count again when redone."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += rows

    def total(self) -> int:
        return self.rows
