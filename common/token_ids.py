"""The message every backend gives for token ids outside the vocabulary.

The backends check the range themselves (a min/max on their array, every step); this only words
the error, so the torch, ONNX Runtime and TensorRT backends say the same thing. Standard library
only: it takes plain nested lists (``array.tolist()``).
"""

from __future__ import annotations

from typing import Sequence

_SHOWN_IDS = 3  # distinct bad ids named
_SHOWN_PLACES = 5  # positions named per id


def bad_token_ids_message(
    ids_BS: Sequence[Sequence[int]], position_ids_BS: Sequence[Sequence[int]], vocab_size: int
) -> str:
    """``token ids must lie in [0, V), got 99999 (at positions 0, 1), -3 (at position 4)``.

    Positions are the tokens' places in their sequences (``position_ids``), so for a prompt they
    are indices into it; with more than one sequence each place also names its sequence.
    """
    batch = len(ids_BS)
    places: dict[int, list[str]] = {}
    for b, (row, pos_row) in enumerate(zip(ids_BS, position_ids_BS)):
        for token, pos in zip(row, pos_row):
            if not 0 <= token < vocab_size:
                places.setdefault(int(token), []).append(f"{pos}" if batch == 1 else f"sequence {b} position {pos}")
    parts = []
    for token, where in list(places.items())[:_SHOWN_IDS]:
        more = len(where) - _SHOWN_PLACES
        shown = ", ".join(where[:_SHOWN_PLACES]) + (f" and {more} more" if more > 0 else "")
        label = ("positions " if len(where) > 1 else "position ") if batch == 1 else ""
        parts.append(f"{token} (at {label}{shown})")
    if len(places) > _SHOWN_IDS:
        parts.append(f"and {len(places) - _SHOWN_IDS} more distinct ids")
    return f"token ids must lie in [0, {vocab_size}), got {', '.join(parts)}"
