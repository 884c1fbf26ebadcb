"""DATASET as a mixture of sources: `DATASET=ruslanmv/ai-medical-chatbot:0.8,general.jsonl:0.2` (README, Your data).

A comma separates the sources; a source's weight follows its last ":" when that text is a number (a Hub id has no
":"; a local path keeps any ":" that is not followed by a number only). A source without a weight weighs 1.
Weights are shares: they are divided by their sum, so 0.8,0.2 and 4,1 draw the same rows. A DATASET without a
comma is one source, read exactly as before mixtures existed.
"""

from __future__ import annotations

import math

SEP = ","


def _split(entry: str) -> tuple[str, str | None]:
    """(source, its weight's text or None) of one comma-separated entry."""
    name, colon, weight = entry.rpartition(":")
    try:
        float(weight)
    except ValueError:
        return entry, None
    return (name, weight) if colon and name else (entry, None)


def problem(value: str) -> str | None:
    """What is wrong with DATASET as a source list, or None (config.py's check of the setting)."""
    entries = [e.strip() for e in value.split(SEP)]
    if len(entries) == 1:
        name, weight = _split(entries[0])
        if weight is None:
            return None
        return f"a weight means nothing for one source: drop ':{weight}', or add the other sources after a comma"
    if "" in entries:
        return "an empty source between commas; write DATASET=source:weight,source:weight (README, Your data)"
    names = [_split(e)[0].strip() for e in entries]
    if bad := _bad_weight(entries):
        return bad
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        return f"{', '.join(map(repr, dupes))} is listed twice; list each source once, with the sum of its weights"
    return None


def _bad_weight(entries: list[str]) -> str | None:
    for name, weight in map(_split, entries):
        if weight is not None and not 0 < float(weight) < math.inf:  # nan, inf, 0 and below
            return f"the weight of {name.strip()!r} is {weight}: a weight must be a number above 0 (shares: 0.8,0.2)"
    return None


def sources(value: str) -> list[tuple[str, float]]:
    """The (source, share) pairs of a valid DATASET, shares summing to 1: one (DATASET, 1.0) for a single source."""
    entries = [_split(e.strip()) for e in value.split(SEP)]
    if len(entries) == 1:
        return [(value, 1.0)]
    weights = [float(w) if w is not None else 1.0 for _, w in entries]
    return [(name.strip(), w / sum(weights)) for (name, _), w in zip(entries, weights)]


def input_names(value: str) -> list[tuple[str, str]]:
    """(the name provenance records a source under, the source): DATASET itself for one source (as before
    mixtures), DATASET[source] for each source of a mixture; a Hub source's pin has the same name."""
    pairs = sources(value)
    return [("DATASET" if len(pairs) == 1 else f"DATASET[{name}]", name) for name, _ in pairs]


def quotas(total: int, shares: list[float]) -> list[int]:
    """`total` rows split to the shares, each rounded down, the rest one each to the largest remainders (ties: the
    first source): the counts sum to `total` and none is more than one row from its share."""
    exact = [total * s for s in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda k: (counts[k] - exact[k], k))
    for k in by_remainder[: total - sum(counts)]:
        counts[k] += 1
    return counts
