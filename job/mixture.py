"""DATASET as a mixture of sources: `DATASET=ruslanmv/ai-medical-chatbot:0.8,general.jsonl:0.2`, or a mixture file,
`DATASET=mix.yaml`, whose sources may each set their own format, columns and split (README, Your data).

A comma separates the sources; a source's weight follows its last ":" when that text is a number (a Hub id has no
":"; a local path keeps any ":" that is not followed by a number only). A source without a weight weighs 1.
Weights are shares: they are divided by their sum, so 0.8,0.2 and 4,1 draw the same rows. A DATASET without a
comma is one source, read exactly as before mixtures existed.

A mixture file (.yaml or .yml):

    sources:
      - dataset: ruslanmv/ai-medical-chatbot
        weight: 0.8
      - dataset: clinic_faq.csv        # a relative path is read from the mixture file's folder
        weight: 0.2
        format: columns
        patient_column: question
        doctor_column: answer

Each source's keys (PER_SOURCE) stand for the setting of that name, for that source only; the rest are the run's.
The file is an input of the sample stage like the sources (job/provenance.py): an edit to it is a new sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from job.errors import ConfigError
from job.files import is_local_path
from job.formats import FORMATS

SEP = ","
FILE_SUFFIXES = (".yaml", ".yml")
# A mixture file's keys for one source: the setting each stands for (each str, checked below)
PER_SOURCE = {
    "split": "DATASET_SPLIT",
    "format": "DATA_FORMAT",
    "description_column": "DESCRIPTION_COLUMN",
    "patient_column": "PATIENT_COLUMN",
    "doctor_column": "DOCTOR_COLUMN",
}
KEYS = ("dataset", "weight", *PER_SOURCE)


@dataclass(frozen=True)
class Source:
    name: str  # the source's DATASET: a Hub id, or a local path (resolved against a mixture file's folder)
    share: float  # of the rows, the shares summing to 1
    settings: dict[str, str] = field(default_factory=dict)  # settings it sets for itself (PER_SOURCE's)


def is_file(value: str) -> bool:
    """Whether DATASET names a mixture file."""
    value = value.strip()
    return SEP not in value and Path(value).suffix.lower() in FILE_SUFFIXES


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
    if files := [n for n in names if is_file(n)]:
        return f"{files[0]!r} is a mixture file: give it alone as DATASET, with every source listed in it"
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


def entries(value: str) -> list[Source]:
    """The sources of a valid DATASET, shares summing to 1: one Source(DATASET, 1.0) for a single source. A mixture
    file is read here (ConfigError naming the file, the source and the key when it is not one)."""
    if is_file(value):
        return read_file(Path(value.strip()).expanduser())
    pairs = [_split(e.strip()) for e in value.split(SEP)]
    if len(pairs) == 1:
        return [Source(value, 1.0)]
    weights = [float(w) if w is not None else 1.0 for _, w in pairs]
    return [Source(name.strip(), w / sum(weights)) for (name, _), w in zip(pairs, weights)]


def named(value: str) -> list[tuple[str, Source]]:
    """Each source of a valid DATASET with the name provenance records it under: DATASET itself for one source
    (as before mixtures), DATASET[source] for each source of a mixture or a mixture file; a Hub source's pin has
    the same name. A mixture file is read once, here."""
    found = entries(value)
    one = len(found) == 1 and not is_file(value)
    return [("DATASET" if one else f"DATASET[{s.name}]", s) for s in found]


def input_names(value: str) -> list[tuple[str, str]]:
    """(the name provenance records a source under, the source) for each source of DATASET (see named)."""
    return [(key, s.name) for key, s in named(value)]


def read_file(path: Path) -> list[Source]:
    """A mixture file's sources (module docstring), each checked: its keys, its weight, its settings' values."""
    import yaml  # PyYAML: Transformers' and datasets' dependency, and ours

    where = f"DATASET={str(path)!r}"
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{where}: the mixture file cannot be read ({e.strerror or e}). Check the path.") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: not a YAML file ({str(e).splitlines()[0]}); see README, Your data") from None
    listed = doc.get("sources") if isinstance(doc, dict) and set(doc) == {"sources"} else None
    if not isinstance(listed, list) or not listed:
        raise ConfigError(f"{where}: a mixture file holds one key, sources: a list of sources (README, Your data)")
    found = [_source(path.parent, entry, f"{where}, source {i + 1}") for i, entry in enumerate(listed)]
    names = [name for name, _, _ in found]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError(f"{where}: {dupes[0]!r} is listed twice; list each source once, with the sum of its weights")
    total = sum(weight for _, weight, _ in found)
    return [Source(name, weight / total, settings) for name, weight, settings in found]


def _source(folder: Path, entry: object, where: str) -> tuple[str, float, dict[str, str]]:
    if not isinstance(entry, dict) or not isinstance(entry.get("dataset"), str) or not entry["dataset"].strip():
        raise ConfigError(f"{where}: give each source its dataset: a Hub id or a file (- dataset: rows.jsonl)")
    if unknown := [k for k in entry if k not in KEYS]:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; a source's keys are {', '.join(KEYS)}")
    weight = entry.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
        raise ConfigError(f"{where}: weight {weight!r}; a weight must be a number above 0 (shares: 0.8 and 0.2)")
    settings = {}
    for key, setting in PER_SOURCE.items():
        if key in entry:
            value = entry[key]
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{where}: {key} must be a non-empty text, not {value!r}")
            if key == "format" and value not in ("auto", *FORMATS):
                raise ConfigError(f"{where}: format {value!r}; use one of auto, {', '.join(FORMATS)}")
            settings[setting] = value.strip()
    return _resolve(entry["dataset"].strip(), folder), float(weight), settings


def _resolve(name: str, folder: Path) -> str:
    """A source's DATASET: a local path relative to the mixture file's folder made whole; a Hub id as it is."""
    path = Path(name).expanduser()
    if path.is_absolute():
        return str(path)
    local = is_local_path(name) or (folder / path).exists()  # a file's type, a "./", or a file beside the mixture
    return str((folder / path).resolve()) if local else name


def quotas(total: int, shares: list[float]) -> list[int]:
    """`total` rows split to the shares, each rounded down, the rest one each to the largest remainders (ties: the
    first source): the counts sum to `total` and none is more than one row from its share."""
    exact = [total * s for s in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda k: (counts[k] - exact[k], k))
    for k in by_remainder[: total - sum(counts)]:
        counts[k] += 1
    return counts
