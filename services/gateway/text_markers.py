"""Markers in streamed text: how much of a text's end may be the start of a marker, and so
must wait for the next piece before it can be passed on."""


def partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker` (0 if none)."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
