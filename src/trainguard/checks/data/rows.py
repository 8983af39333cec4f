"""What a validation pass keeps per valid row, and the normalization its content hashes are made from.

Memory grows with the number of rows, never with the size of the text: a row costs about 40 bytes in a
:class:`RowTable` (four 8-byte content hashes, its line number or record index, and its length in characters);
duplicate, contradiction and overlap analysis runs on those arrays at the end (numpy sort/unique), so no text is
kept. :func:`norm` is the normalized form (case and whitespace ignored) the near-duplicate, contradiction and
overlap checks compare.
"""

from __future__ import annotations

import bisect
from array import array
from typing import Any

__all__ = ["WHITESPACE", "RowTable", "content_text", "norm", "percentiles"]

WHITESPACE = b" \t\n\r\x0b\x0c"


class RowTable:
    """Per valid row, by ordinal (reading order): content hashes, location and characters.

    Attributes:
        exact: Hash of the row's fields as they are (exact duplicates).
        normal: Hash of the normalized fields (near-duplicates, eval overlap).
        prompt / answer: Hashes of the normalized prompt and answer (contradictory labels); 0 when the format has
            none (text, tokenized).
        locs: The 1-based line (text files) or 0-based record index of the row in its part.
        chars: The row's length in characters.
        part_starts / part_info: The first ordinal of each part, and its (label, kind): ordinals are assigned in
            reading order, so a part's rows are one contiguous range.
    """

    def __init__(self) -> None:
        self.exact = array("q")
        self.normal = array("q")
        self.prompt = array("q")
        self.answer = array("q")
        self.locs = array("q")
        self.chars = array("q")
        self.part_starts: list[int] = []
        self.part_info: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.exact)

    def start_part(self, label: str, kind: str) -> None:
        """The rows added from now on belong to the part ``label`` (``kind`` ``"line"`` or ``"row"``)."""
        self.part_starts.append(len(self.exact))
        self.part_info.append((label, kind))

    def add(self, e: int, n: int, p: int, a: int, loc: int, chars: int) -> int:
        """Record one valid row; return its ordinal."""
        ordinal = len(self.exact)
        self.exact.append(e)
        self.normal.append(n)
        self.prompt.append(p)
        self.answer.append(a)
        self.locs.append(loc)
        self.chars.append(chars)
        return ordinal

    def location(self, ordinal: int) -> dict[str, Any]:
        """Where row ``ordinal`` is: ``{"file": label, "line": n}`` or ``{"file": label, "row": n}``."""
        i = bisect.bisect_right(self.part_starts, ordinal) - 1
        label, kind = self.part_info[i]
        loc = self.locs[ordinal]
        return {"file": label, "line": loc} if kind == "line" else {"file": label, "row": loc}


def norm(text: str) -> bytes:
    """The normalized form used for near-duplicates, contradictions and overlap: case and whitespace ignored.

    Removing all whitespace (rather than collapsing it) is one C-level ``bytes.translate``, about twice as fast as
    ``" ".join(text.split())``; it also equates ``"a bc"`` with ``"ab c"``, which is rare and still a near-duplicate.
    """
    return text.lower().encode("utf-8", "surrogatepass").translate(None, WHITESPACE)


def content_text(content: Any) -> str:
    """The text of a chat message's ``content``: the string, or the text parts of multimodal content."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal content parts: only the text parts count
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def percentiles(values: Any) -> dict[str, Any]:
    """p50/p90/p99/max/mean of a numpy array of lengths (zeros when it is empty)."""
    import numpy as np

    if len(values) == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0}
    p50, p90, p99 = np.percentile(values, [50, 90, 99], method="higher")
    return {
        "p50": int(p50),
        "p90": int(p90),
        "p99": int(p99),
        "max": int(values.max()),
        "mean": round(float(values.mean()), 1),
    }
