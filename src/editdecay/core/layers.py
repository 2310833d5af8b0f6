"""Layer lists as users write them ("4-8", "4,5,6"), parsed in one place (no heavy imports)."""

from __future__ import annotations


def parse_layer_text(text: str) -> tuple[int, ...]:
    """"4-8" -> (4, ..., 8); "4,5,6" -> (4, 5, 6). Raises ValueError naming the text."""
    out: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise ValueError(f"{text!r} is not a layer list; give integers or ranges, e.g. [4, 5, 6] or '4-8'") from None
    if not out or any(l < 0 for l in out):
        raise ValueError(f"{text!r}: layer indices must be integers >= 0")
    return tuple(sorted(set(out)))
