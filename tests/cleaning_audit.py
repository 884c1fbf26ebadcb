"""Measure the cleaning on real rows: what is left that should not be, and which rows are dropped.

    .venv/bin/python tests/cleaning_audit.py [FILE.jsonl] [--before GIT_REF [--show N]]

Reads the Doctor field of every row of FILE (default: the shared 2,656-row sample), cleans it with
job/clean.py, and prints counts a reader can check: kept replies still ending in a doctor's name or
credentials, still naming the platform, still opening with a platform greeting; e-mails and URLs left;
rows dropped per reason; rows changed per rule. With --before, the same counts for the cleaning at
GIT_REF (job/clean.py there, or job/sample.py for commits older than clean.py), then how many replies the
two clean differently and the first N of those differences. Prints only; writes nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from difflib import SequenceMatcher
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The shared sample sits beside the checkout (or beside the folder of worktrees that holds it).
SHARED = next(
    (
        p / "shared" / "data" / "medical_dialogues_sample.jsonl"
        for p in REPO.parents
        if (p / "shared" / "data").is_dir()
    ),
    REPO.parent / "shared" / "data" / "medical_dialogues_sample.jsonl",
)
MIN_REPLY_CHARS = 20  # job.sample.MIN_REPLY_CHARS

DEGREE = r"MBBS|M\.?D|MS|DNB|DM|FRCS|DGO|DDVL|DCH|MRCP|FCPS|DDV|BAMS|BHMS|BDS|MDS|DVD|Ph\.?D"
# A reply that ends in a signature: "Dr" with up to four name words, a degree, or a letter closer.
ENDS_IN_SIGNATURE = re.compile(
    rf"(?:\bdr\b\.?\s*(?:[A-Za-z][\w.]*[\s,.]*){{0,4}}|\b(?:{DEGREE})\b\.?|\b(?:regards|sincerely|rgds)\b)[\W]*$",
    re.I,
)
PLATFORM = re.compile(
    r"health\s*care\s*magic|\bhcm|h\.c\.m|i\s?clini[cq]|chat\s*doctor|ask\s+a\s+doctor['’\"]?\s+service", re.I
)
QUERY_GREETING = re.compile(
    r"^\W*(?:(?:hi+|hello|hey|dear)\b[\w\s,.!]{0,25}?)?"
    r"(?:thanks?(?:\s+you)?\s+for\s+(?:your|the|writing|asking|posting|using|choosing|contacting)|welcome\s+to)",
    re.I,
)
EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+")
URL = re.compile(r"https?://|www\.", re.I)


def cleaner(ref: str | None):
    """clean_text from job/clean.py, or as it was at git `ref` (job/clean.py, or job/sample.py before it existed)."""
    if ref is None:
        from job.clean import clean_text

        return clean_text
    for path in ("job/clean.py", "job/sample.py"):
        shown = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:{path}"], capture_output=True, text=True)
        if shown.returncode == 0:
            source = shown.stdout
            break
    else:
        sys.exit(f"--before {ref}: neither job/clean.py nor job/sample.py exists at that commit")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("sample_before", f.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (clean.py's Rule) look their module up while it loads
    spec.loader.exec_module(module)
    return module.clean_text


def audit(replies: list[str], clean_text) -> dict:
    changed: Counter = Counter()
    dropped: Counter = Counter()
    kept = []
    for raw in replies:
        out = clean_text(raw, "doctor", changed)
        if not out:
            dropped["empty_doctor"] += 1
        elif len(out) < MIN_REPLY_CHARS:
            dropped["reply_too_short"] += 1
        else:
            kept.append(out)

    def share(pattern: re.Pattern, search=True) -> str:
        n = sum(bool(pattern.search(t) if search else pattern.match(t)) for t in kept)
        return f"{n} ({100 * n / max(1, len(kept)):.1f}%)"

    return {
        "rows": len(replies),
        "kept": len(kept),
        "dropped": dict(sorted(dropped.items())),
        "ending_in_name_or_credentials": share(ENDS_IN_SIGNATURE),
        "naming_the_platform": share(PLATFORM),
        "opening_with_query_greeting": share(QUERY_GREETING, search=False),
        "emails_left": sum(len(EMAIL.findall(t)) for t in kept),
        "urls_left": sum(len(URL.findall(t)) for t in kept),
        "changed_per_rule": {k.split(".", 1)[1]: v for k, v in sorted(changed.items())},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", nargs="?", default=str(SHARED))
    ap.add_argument("--before", metavar="GIT_REF", help="also measure the cleaning at this commit and compare")
    ap.add_argument("--show", type=int, default=10, metavar="N", help="with --before: differences to print")
    args = ap.parse_args()
    rows = [json.loads(line) for line in Path(args.file).read_text(encoding="utf-8").splitlines() if line.strip()]
    replies = [str(r.get("Doctor") or "") for r in rows]
    now = cleaner(None)
    if args.before is None:
        print(json.dumps(audit(replies, now), indent=2))
        return
    before = cleaner(args.before)
    print(json.dumps({"before": audit(replies, before), "after": audit(replies, now)}, indent=2))
    pairs = [(i, before(r), now(r)) for i, r in enumerate(replies)]
    differ = [(i, a, b) for i, a, b in pairs if a != b]
    print(f"replies cleaned differently: {len(differ)} of {len(replies)}")
    for i, a, b in differ[: args.show]:
        print(f"\nrow {i}:")
        for op, a1, a2, b1, b2 in SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
            if op != "equal":
                print(f"  ...{a[max(0, a1 - 50) : a1]!r} before {a[a1:a2]!r} after {b[b1:b2]!r}")


if __name__ == "__main__":
    main()
