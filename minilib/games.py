"""Cooperative games: the contract every game in the book follows.

Introduced in chapter 00 (a model with a calibration set is a game) and developed in
chapter 01. A game has ``n_players`` and maps a batch of coalitions, a bool array of shape
``(m, n_players)`` where ``True`` means "in the coalition", to ``m`` float values.
"""

from __future__ import annotations

import numpy as np


def as_coalitions(coalitions, n_players: int, name: str = "coalitions") -> np.ndarray:
    """Validate a batch of coalitions and return it as a 2-D bool array (chapter 01).

    A single coalition (1-D) becomes a batch of one. Numbers are accepted only when they
    are exactly 0 or 1; anything else raises, naming ``name``.
    """
    arr = np.asarray(coalitions)
    if arr.dtype != bool:
        if arr.dtype.kind not in "iuf":
            raise TypeError(f"{name} must be a bool array (or 0/1 numbers), got dtype {arr.dtype}")
        ok = np.isin(arr, (0, 1))
        if not ok.all():
            raise ValueError(f"{name} must hold only 0/1 (or booleans), found {arr[~ok].ravel()[:5].tolist()}")
        arr = arr.astype(bool)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (m, {n_players}), got {arr.shape}")
    if arr.shape[1] != n_players:
        raise ValueError(f"{name} must have {n_players} columns (one per player), got {arr.shape[1]}")
    return arr


class Game:
    """Base class of batched cooperative games (chapter 01).

    Subclasses set ``n_players`` and implement :meth:`value`, which receives validated
    coalitions as a bool array ``(m, n_players)`` and returns ``m`` floats. Calling the game
    validates its input first, so every game rejects malformed coalitions the same way.
    """

    n_players: int

    def value(self, coalitions: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, coalitions) -> np.ndarray:
        masks = as_coalitions(coalitions, self.n_players)
        return np.asarray(self.value(masks), dtype=float).reshape(len(masks))

    def empty_value(self) -> float:
        """v(∅), the value of the empty coalition."""
        return float(self(np.zeros((1, self.n_players), dtype=bool))[0])

    def grand_value(self) -> float:
        """v(N), the value of the grand coalition."""
        return float(self(np.ones((1, self.n_players), dtype=bool))[0])
