"""Cleaning a conversation's text: cut platform boilerplate as the phrase it is, keep every word of advice.

The source replies (HealthcareMagic, iCliniq) were written on Q&A platforms and often run sentences
together without a space ("...the gel.If it is so..."), so nothing here removes a whole "sentence":
each rule matches a phrase with a bounded extent (a greeting, "thanks for your query at HCM", "hope
this helps", a sign-off block at the very end) and only that phrase is cut. What is left around a cut
is tidied (stray commas, a lone "Hi,", a bare "Regards") so no fragment survives.

The rules are one table, RULES at the end: each entry names the rule, the fields it cleans, its pattern
(built from the shared fragments below), what it does there (cut the span, replace it, cut the tail from
here) and the text it must cut and must keep, which tests/test_cleaning.py runs. A new rule is one entry.
Rules match structure, not names: sign-off blocks are recognised by their shape (a closing word, "Dr",
capitalised words, degree abbreviations such as MBBS/MD/DNB, specialty words) at the end of the reply,
never by a list of doctors.

Hand-written regular expressions rather than a library: no maintained package knows this
dataset's boilerplate, and the sentence splitters we could use (nltk, spaCy) need the whitespace
after a full stop that these replies lack.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# --- fragments the rules' patterns share -----------------------------------------------------------------
# The platforms the replies were written on, and how doctors spelled them ("HCM", "H.C.M.F.",
# "Healthcare Magic forum", "'Ask A Doctor' service", "Chat Doctor" as the public dataset anonymises it).
PLATFORM = (
    r"(?:health\s*care\s*magic(?:\.com)?|heal\w{0,8}[\s-]*magic(?:\.com)?"  # and its misspellings
    r"|h\.?\s?c\.?\s?m\b\.?(?:\s?f\b\.?)?|hcm(?:f(?-i:(?![a-z])))?(?=[A-Z]|\b)"  # HCM, H.C.M.F., "HCMThe"
    r"|chat\s*doctor(?:\.com)?|i\s?clini[cq](?:\.com)?|i[a-z]{3,6}q\.com"  # iCliniq, "ilciniq.com"
    r"|[\"'‘’“”]?ask\s+a\s+doctor[\"'‘’“”]?(?=\s+service)|[\"'‘’“”]ask\s+a\s+doctor[\"'‘’“”])"
    r"(?:\s*(?:forum|services?|platform|website|site|portal)(?-i:(?![a-z])))?"
)
# Imperatives that open advice ("Stop smoking.", "Use Betadine"): never a name.
_VERBS = (
    r"use|apply|avoid|drink|eat|rest|wash|keep|stop|start|do|don'?t|try|continue|give|put|wear|stay|"
    r"quit|follow|repeat|need|must|would|could|get|have|let|make|call|contact|write|ask|consult|see|visit|go"
)
# A greeting that opens a reply ("Hi", "Hello dear", "Hi friend", "Hi rick5547"); only cut together
# with the platform phrase right after it, so "Hello, your fever is viral" keeps its "Hello,".
_GREETING = (
    r"(?:^|(?<=\n))[\s\"'‘’“”]*(?:(?:hi+|hai|hello|hey|dear|respected|greetings|good\s+(?:morning|evening|afternoon|day))"
    r"(?:[\s,.!:;\-]*(?:(?:there|dear|friend|sir|madam|ma'?am|and|user|hi+|hello|mr\.?|mrs\.?|ms\.?|[a-z]+\d+)(?-i:(?![a-z]))"
    r"|sir\s*/\s*madam|dear(?=thank|welcome|well|warm)|hi(?=thank|welcome|well)))*"
    r"[\s,.!:;\-‘’“”\"']*"
    # after a greeting, a first name or user name and its comma: "Hi!Melissa, Welcome ...", "Hello Mr Rao. Thanks"
    rf"(?:(?!(?:{_VERBS})(?-i:(?![a-z])))"
    r"(?:[a-z][\w]*\s*[,;:!.\-]+|[a-z][\w]*\s+[a-z][\w]*\s*[,;:!\-]+)\s*)?"  # "Hello. Exercise daily." is advice
    # without a greeting only one word and a comma ("Tanya, welcome ..."): "Stop smoking. Thanks for ..." is advice
    r"|[a-z][\w]*\s*[,;:!\-]+\s*)?"
)
_END = r"[\s]*[.!,;:‘’“”\"']*"  # the punctuation that belonged to the cut phrase
_OBJ = r"(?:your|the|this|a|an|my|our)"
_TOPIC = (
    r"(?:quer(?:y|ies)|questions?|concerns?|doubts?|problems?|issues?|history|details|information|info|complaints?|"
    r"complain|contact)"
)
_SITE = (
    rf"(?:(?:our|this|the|world'?s)\s+(?:[\w'’-]+\s+){{0,4}}?)?(?:site|website|forum|platform|service|portal)(?-i:(?![a-z]))"
    rf"(?:\s*{PLATFORM})?"
)
_PREP_PLATFORM = (
    rf"(?:\s*,?\s*(?:to|at|on|in|with|through|from|via|using|under|here\s+(?:at|on))\s*"
    rf"(?:the\s+|us\s+(?:at|on)\s+)?{PLATFORM}|\s+(?:to|with)\s+us|\s+here)?"
)


# A phrase starts a word, or a run-on sentence glued to the last one ("careIn case ...", "gel.If ...").
_START = r"(?:(?<![\w])|(?-i:(?<=[a-z])(?=[A-Z])))"


def _to_clause_end(n: int) -> str:
    """The rest of a clause, at most `n` characters: up to a sentence end, a newline or a run-on capital."""
    return rf"[^.!?\n]{{0,{n}}}?(?=[.!?\n]|(?-i:[a-z][A-Z])|$)"


_FURTHER = r"(?:further|other|more|any|additional|follow[\s-]?up)"  # "any further queries"


# --- sign-off blocks ------------------------------------------------------------------------------------
# A sign-off is recognised at the end of the reply by its shape: closing words, "Dr", a name,
# degrees, specialty and title words, a clinic address. Only these tokens may follow the anchor.
_CLOSERS = (
    r"(?:with\s+)?(?:(?:best|warm|kind|kindest|warmest|healthiest|sincere|respectful)\s+)?regards|rgds|regds|thanks\s*(?:&|and)\s*regards|"
    r"thank\s*you\s*(?:&|and)\s*regards|(?:and\s+)?thanks\s+(?:(?:very|so)\s+much|a\s+lot)|sincerely|yours\s+(?:truly|sincerely|faithfully)|yours|best\s+wishes|"
    r"warm\s+wishes|with\s+best\s+wishes|good\s+wishes|wishes|thanks|thank\s*you|thanx|thankyou|take\s*care|good\s*luck|"
    r"all\s+the\s+best|best\s+of\s+luck|bye|ok|thanking\s+you|(?:and|&)\s*take\s*care|(?:and|&)\s*regards|ok\s+and\s+bye|cheers|god\s+bless(?:\s+you)?|have\s+a\s+(?:nice|good|healthful)\s+day"
)
_LETTER_CLOSER = re.compile(
    r"regards|sincerely|yours|best\s+wishes|warm\s+wishes|good\s+wishes|wishes|thanks|thank\s*you|thanx|cheers",
    re.I,
)
DEGREES = (
    r"mbbs|m\.?b\.?b\.?s|md|m\.d|ms|dnb|dm|frcs|dgo|ddvl|dch|mrcp|fcps|ddv|dvd|dvl|bams|b\.?a\.?m\.?s|bhms|bds|"
    r"mds|dpm|dpmr|phd|ph\.d|facs|facp|mch|m\.ch|dph|mph|fics|doms|dlo|frcog|mrcog|mrcpch|faap|msc|bsc|mpt|bpt|"
    r"pgdcc|fccp|dtcd|dih|fnb|mmed|mrcs|fiages|fcgp|fage|dmrd|dmre|ficog|fmas|frcp|fracp|mrcgp|fapp|dnb|"
    r"dipl?|diploma|pg|pgd|pgdip|llb|ll\.b|llm|ll\.m|mba|bpharm|mpharm|pharmd|rn|np|pa-c|do|dds|dmd|od|"
    r"mscp|fipp|frcpath|mrcpsych|dpsych|mcps|fcgs|mnams|fiapsm|ficp|diab|cce|ccst|cct|fellow|board|certified"
)
_SPECIALTY = (
    r"[a-z]*(?:ologist|iatrist|iatrician|ician|gist|tist|pist|cist|list|surgeon|surgery|medicine|therapist|physio|therapy|"
    r"consultant|specialist|practitioner|doctor|physician|dentist|gynaecologist|obstetrician|pediatrics|"
    r"paediatrics|clinic|hospital|hospitals|centre|center|polyclinic|nursing|home|care|health|institute|"
    r"college|road|street|nagar|sector|sect|east|west|north|south|near|opp|floor|department|dept|unit|head|"
    r"senior|junior|chief|resident|registrar|professor|prof|asst|assistant|associate|hod|general|family|"
    r"internal|emergency|critical|child|women|skin|hair|heart|eye|ent|dental|oral|maxillofacial|ortho|"
    r"orthopaedic|orthopedic|cardiac|neuro|homeopathic|homoeopathic|ayurvedic|physical|sexual|mental|"
    r"plastic|cosmetic|laser|fertility|ivf|diabetes|obesity|sleep|pain|sports|rehab|rehabilitation)"
)
_CONNECTORS = r"of|and|in|at|the|for|with|&|from|to|on|a|an|by|as|via|cum"
# "Dr", "Dr.", "DrSudarshan" (glued to the name), but not "Drink" nor the "DR" of "DRINK".
_DR = r"(?:dr(?-i:(?![a-z])(?![A-Z][A-Z]))|doctor(?-i:(?![a-z]))|prof(?-i:(?![a-z]))|professor)\.?"
_SIG_TOKEN = re.compile(r"[A-Za-z][\w'’.&]*|\d[\d\-/]*|[&]", re.U)


# Degrees that are also everyday words count only as written in a signature: "DO", "MS", "Board", not the
# "do" of "talk to your doctor. Please do not worry."
_WORD_DEGREES = {"do": str.isupper, "ms": str.isupper, "od": str.isupper, "pa-c": str.isupper, "np": str.isupper}
_WORD_DEGREES |= dict.fromkeys(
    ("rn", "pg", "board", "fellow", "certified", "diploma", "unit"), lambda w: w[:1].isupper()
)


def _is_degree(word: str) -> bool:
    written = _WORD_DEGREES.get(word.rstrip(".").lower())
    if written is not None and not written(word.rstrip(".")):
        return False
    return bool(re.fullmatch(rf"(?:{DEGREES})\.?", word, re.I)) or bool(re.fullmatch(r"(?:[A-Z]\.){2,}[A-Z]?\.?", word))


_SIG_WORD = re.compile(rf"(?:{_SPECIALTY}|{_CONNECTORS})", re.I)  # a word a signature holds besides names


def _signature_tail(tail: str) -> bool:
    """True when `tail` (the text from a candidate anchor to the end) is only a sign-off block."""
    text = re.sub(rf"(?i)^\s*(?:(?:{_CLOSERS})(?-i:(?![a-z]))[\s,.!:;\-–]*)+", "", tail)
    closer = text != tail.lstrip() and bool(_LETTER_CLOSER.search(tail[: len(tail) - len(text)]))
    had_dr = bool(re.match(rf"(?i){_DR}", text))
    body = re.sub(rf"(?i)^{_DR}", "", text)
    # Closing words may also sit inside the block ("Thanks and. Best regards, Luchuo, MD").
    body = re.sub(rf"(?i)(?<![\w])(?:{_CLOSERS})(?-i:(?![a-z]))", " ", body)
    words = _SIG_TOKEN.findall(body)
    if not words:  # only closing words: a fragment when it is a letter closer ("Regards", "Thanks.")
        return closer or had_dr
    return len(words) <= 40 and _signature_words(words, body, closer, had_dr)


def _signature_words(words: list[str], body: str, closer: bool, had_dr: bool) -> bool:
    """The words after the block's closing words and "Dr" are a signature's: degrees, specialty and title words,
    a name that a closing word, "Dr" or a degree vouches for."""
    bare = [w.strip(".'’") for w in words]
    degrees = any(map(_is_degree, bare))
    titled = any(not _SIG_WORD.fullmatch(b) and re.fullmatch(rf"(?:{_DR})", w, re.I) for w, b in zip(words, bare))
    if not (had_dr or closer or degrees or titled):
        return False
    if closer and not had_dr and not degrees and not _vouched_name(words, body):
        return False
    # A clinic address may hold a word or two in lowercase ("Matunga east") and numbers; lowercase names only
    # right after "Dr": "Regards dr namrata", "Dr. satyanarayan kabra".
    names = 3 if had_dr else 0
    lowercase = sum(not _signature_word(w, b, k < names) for k, (w, b) in enumerate(zip(words, bare)))
    return lowercase == 0 or (had_dr and degrees and lowercase <= 2)


def _signature_word(word: str, bare: str, name_slot: bool) -> bool:
    if _is_degree(bare) or _SIG_WORD.fullmatch(bare) or re.fullmatch(rf"(?:{_DR})", word, re.I):
        return True
    return bare[:1].isupper() or bare[:1].isdigit() or (name_slot and not re.fullmatch(_STOPWORDS, bare, re.I))


def _vouched_name(words: list[str], body: str) -> bool:
    """Only a closing word vouches for the name ("Regards, Jay Indravadan Patel, Physical Therapist"): up to four
    capitalised name words, specialty words, and no everyday word ("Thanks. Use Betadine")."""
    special = [w for w in words if re.fullmatch(_SPECIALTY, w.strip(".'’"), re.I)]
    names = [w for w in words if w not in special and not re.fullmatch(_CONNECTORS, w, re.I)]
    if len(names) > 4 or len(names) < len(words) - len(special) and not special:
        return False
    # A name is shaped like one ("Jay", "O'Brien", "McDonald", "J.", "JOHN", "M.D.Pediatrician"): a short
    # acronym or a mixed word is a test or a drug ("Thanks. CBC, ESR, CRP, HbA1c"), and three or more single
    # words between commas are a list, not a name and its title.
    name = r"[A-Z](?:[a-z'’\-]+(?:[A-Z][a-z'’\-]+)?|[A-Z]{3,})?\.?|(?:[A-Z]\.)+(?:[A-Z][a-z]+\.?)?"
    if any(not re.fullmatch(name, w) for w in names):
        return False
    if sum(len(_SIG_TOKEN.findall(part)) == 1 for part in body.split(",")) >= 3:
        return False
    return not (names and re.fullmatch(rf"(?:{_STOPWORDS}|{_VERBS})", names[0].strip(".'’"), re.I))  # an imperative


_STOPWORDS = (
    r"you|your|yours|soon|tomorrow|today|now|again|it|is|are|was|be|will|can|may|should|if|not|no|yes|this|that|"
    r"these|those|please|also|immediately|first|once|then|for|who|which|regularly|who|and|or|to|the|a|an|of|in|"
    r"on|at|with|about|as|after|before|visit|see|consult|check|take|get|go|ask|advice|advise|opinion|examination|"
    r"exam|review|appointment|prescription|treatment|he|she|they|them|him|her|his|we|our|us|me|my|i"
)
# Where a sign-off may begin: after a sentence end (with or without the space), after a comma or a
# newline, at a run-on boundary ("applied the gel.Regards" / "momRegards"), or at the very start.
_ANCHOR = re.compile(
    rf"(?:(?<=[.!?,;:\n)\]\-~])|(?-i:(?<=[a-z])(?=[A-Z]))|(?<=\s)|^)\s*(?:(?:{_CLOSERS})(?-i:(?![a-z]))|{_DR})"
    r"|regards(?-i:(?=[A-Z]))",  # glued on both sides: "a speedy recoveryregardsJay Patel"
    re.I,
)
_SIG_PREV = re.compile(
    r"(?:^|[.!?,;:\n)\]\-~]|(?-i:[a-z](?=[A-Z])))\s*$|(?:^|\s)(?:" + _CLOSERS + r")[\s,.!:;\-]*$"
    r"|(?:^|\s)by\s*$",  # "... our asthma video by Dr X" names a doctor as its last words, too
    re.I,
)


# A signature without "Dr" or a closing word: a capitalised name, a comma, then degrees in capitals
# ("... a yearly flu shot. Arnold Zedd, MD, FAAP"). The comma keeps "Take Betadine MS." out.
_NAME_DEGREES = re.compile(
    r"(?:(?<=[.!?\n])|^)\s*(?-i:[A-Z][a-z]+(?:\s+[A-Z]\.?)*(?:\s+[A-Z][a-z'’-]+){1,2}),\s*"
    r"(?:(?-i:[A-Z][A-Za-z.()]{1,8})[\s,]*){1,6}$"
)


def _signoff_start(text: str) -> int | None:
    """Where the trailing sign-off block begins, or None. The earliest anchor whose tail is all signature wins."""
    window = max(0, len(text) - 400)
    for m in _ANCHOR.finditer(text, window):
        start = m.start() + (len(m.group()) - len(m.group().lstrip()))
        if _may_sign(text, start, m.end()) and _signature_tail(text[start:]):
            return start
    m = _NAME_DEGREES.search(text, window)
    if m and any(_is_degree(w.strip(".,()")) for w in re.split(r"[\s,]+", text[m.start() :].split(",", 1)[1])):
        return m.start() + len(m.group()) - len(m.group().lstrip())
    return None


def _may_sign(text: str, start: int, end: int) -> bool:
    """The anchor `text[start:end]` may open a sign-off. "Dr" does after a sentence end or a closing word: advice
    that ends "... see your Dr. soon" or "... see Dr. Smith" is a sentence, not a signature."""
    word = text[start:end]
    if re.fullmatch(rf"(?i){_DR}", word) and not _SIG_PREV.search(text[:start]):
        # Mid-sentence "Dr" is advice ("see Dr. Smith tomorrow") unless degrees follow ("at Dr.X MD, DNB").
        return any(_is_degree(w.strip(".'’")) for w in _SIG_TOKEN.findall(text[end:]))
    if re.fullmatch(r"(?i)(?:take\s*care|good\s*luck|all\s+the\s+best|get\s+well\s+soon)", word):
        # pleasantries stay unless a name follows them
        return bool(re.search(rf"(?i){_DR}|[A-Z][a-z]+\s*$|{_LETTER_CLOSER.pattern}", text[end:]))
    return True


# --- tidying what a cut leaves behind ------------------------------------------------------------------
def whitespace(text: str) -> str:
    text = text.replace("\u00a0", " ").replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t\f\v]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


_CUT = "\x00"  # marks where a phrase was removed, so the tidy-up touches only those places


# Words that only introduced what was cut ("mail us at <e-mail>", "visit us at <link>", "My blog: <link>",
# "following the below link: <link>") go with it: alone they are a fragment, not advice.
_INTRO = re.compile(
    r"(?:(?<![\w])(?:or\s+|and\s+)?for\s+more\s+(?:info(?:rmation)?|details)(?:\s+(?:you|u))?\s*,?"
    r"|(?<![\w])(?:(?:for\s+more\s+(?:info(?:rmation)?|details)|or|and)\s*,?\s*)*"
    r"(?:(?:if|in\s+case)\s+(?:of\s+)?(?:you\s+have\s+)?(?:any\s+)?[\w\s]{0,30}?\s*,?\s*(?:then\s+)?)?"
    r"(?:(?:you|u)\s+(?:can|may)\s+|please\s+|kindly\s+)?"
    r"(?:e-?mail|mail|write(?:\s+down)?|visit|contact|reach|find|call|message|whatsapp|send|read\s+more)"
    r"(?:\s+(?:us|me|them|it|the\s+(?:photos?|pictures?|reports?)))?(?:\s+(?:at|on|to|in|via))\s*[:\-]?"
    r"|(?<![\w])(?:please\s+)?(?:(?:at|on|to|via|through|using|use|visit|following|with|in)\s+)?(?:the\s+|this\s+|my\s+)?"
    r"(?:(?:below|above|following)(?:\s+mentioned)?\s+)?"
    r"(?:url|link|website|web\s*site|blog|e-?mail(?:\s+id)?|mob(?:ile)?|phone|tel|landline|helpline)"
    r"(?:\s+(?:no\.?|number))?\s*[.:\-]?|(?<![\w])(?:clinic|office|source|reference|ref)\s*:"
    r"|(?<=\s)(?:at|to|on|via|by)\s*[:\-]?(?=\s*\x00))\s*(?:\((?=\x00)|(?=[\"'‘“<\[]?\x00))",
    re.I,
)


# Words that only pointed at what was cut: "see <link> for more", "<link> for more details".
_POINTER = re.compile(
    r"(?<![\w])(?<!to\s)(?:for\s+(?:more|further)(?:\s+(?:info(?:rmation)?|details))?\s*,?\s*)?"
    r"(?:please\s+)?(?:see|check|visit|refer\s+to|go\s+to|click(?:\s+on)?|look\s+at|read)(?:\s+(?:this|here))?"
    r"\s*(?=[\"'‘“<\[(]?\s*\x00)",
    re.I,
)
_OUTRO = re.compile(
    r"(?<=\x00)(?P<close>[\"'’”>\])]?)\s*for\s+(?:more|further)(?:\s+(?:info(?:rmation)?|details|reading))?(?=\s*(?:[.!?,;\n]|$))",
    re.I,
)


# A conjunction left alone between two cuts, or between a cut and a sentence end ("... resolved and <cut>").
_LONE_CONJUNCTION = re.compile(r"(?:(?<=\x00)|(?<=[.!?]))\s*(?:and|but|or|so|then)\s*[,.]?\s*(?=\x00)", re.I)


def _tidy(text: str) -> str:
    if _CUT not in text:
        return text
    # Quotes or brackets around nothing but a cut go with it: '"<link>"', "[<link>]", "(<link>)".
    text = re.sub(r"[(\[<\"'‘“]\s*((?:\x00\s*)+)[)\]>\"'’”]", r"\1", text)
    text = _LONE_CONJUNCTION.sub("", _OUTRO.sub(r"\g<close>", _INTRO.sub("", _POINTER.sub("", text))))
    text = re.sub(r"(?i)(?<![\w])(?:and|but|or|so)\s*(?=\x00\W*$)", "", text)
    # Punctuation and spaces around a cut collapse to one separator (see _join_cut).
    text = re.sub(r"(?:(?<=(.))|^)([\s,.;:!?\-\x00]*\x00[\s,;:!?.\-\x00]*)(?=(.)|$)", _join_cut, text, flags=re.S)
    return text


def _join_cut(m: re.Match[str]) -> str:
    before, inner, after = m.groups()
    if before is None:
        return ""  # nothing before the cut: drop the separators
    kept_end = re.match(r"\s*([.!?]+)", inner)  # the sentence end before the cut belongs to the text before it
    if after is None:
        return _join_end(before, kept_end)
    sep = "\n\n" if "\n\n" in inner else ("\n" if "\n" in inner else " ")
    if before in ".!?":
        return sep
    if kept_end:
        return kept_end.group(1) + sep
    if after in ",.;:!?)]":
        return ""  # the cut's own punctuation is gone; the text's next mark follows directly
    if (re.search(r"[.!?]", inner) or before.islower()) and after[:1].isupper():
        return "." + sep  # a cut between "feed" and "Dr ..." or "Hope" was a sentence boundary
    if inner.replace(_CUT, "").lstrip().startswith(","):
        return "," + sep if not after[:1].isupper() else sep
    return sep


def _join_end(before: str, kept_end: re.Match[str] | None) -> str:
    """A cut at the end of the text: keep a sentence end that was already there before it ("Any worries? <cut>")."""
    if kept_end and before not in ".!?":
        return kept_end.group(1)[:1]
    return "." if before.isalnum() or before in ")]\"'" else ""


def _finish(text: str, started_with: str) -> str:
    text = whitespace(re.sub(r"\s*\(\s*\)", "", text))  # "(<link>)" leaves "()"
    text = re.sub(r"([.!?][)\]\"'’”]+)\.$", r"\1", text)  # "etc.)" + a cut sentence end is not "etc.)."
    text = re.sub(r"^[\s,.;:!?\-~]+", "", text)
    text = re.sub(r"(?<=[.!?])[\s~\-–]+$", "", text)
    if text != started_with and re.search(r"\w[\s,;:\-]+$", text):  # "... will be fine,<cut>" ends its sentence
        text = re.sub(r"[\s,;:\-]+$", ".", text)
    # Capitalise a reply whose opening was cut ("dearthanks for your query at HCMyour doctor ...").
    if text and text[:1].islower() and started_with[:1] != text[:1]:
        text = text[0].upper() + text[1:]
    return text


# --- what a rule does at its matches ---------------------------------------------------------------------------
Step = Callable[[str], str]


def cut(pattern: str | re.Pattern[str], when: Callable[[re.Match[str]], Any] | None = None) -> Step:
    """Cut every match of `pattern` (a string is compiled ignoring case) for which `when(match)` holds."""
    pattern = re.compile(pattern, re.I) if isinstance(pattern, str) else pattern
    if when is None:
        return lambda text: pattern.sub(_CUT, text)
    return lambda text: pattern.sub(lambda m: _CUT if when(m) else m.group(), text)


def cut_phrase(body: str, *, greeting: bool = False) -> Step:
    """Cut the phrase `body` and the punctuation that belonged to it. It starts a word or a run-on sentence; after a
    greeting (`greeting`) it may be glued to it ("HIWell come to HCM"), and the greeting goes with it."""
    lead = rf"(?:{_GREETING}|{_START})" if greeting else _START
    return cut(re.compile(rf"{lead}(?:{body}){_END}", re.I | re.M))


def replace(pattern: str, how: Callable[[re.Match[str]], str]) -> Step:
    """Replace every match of `pattern` (compiled ignoring case) by `how(match)`, which marks what it cuts with _CUT."""
    pattern = re.compile(pattern, re.I)
    return lambda text: pattern.sub(how, text)


def in_turn(*steps: Step) -> Step:
    return lambda text: functools.reduce(lambda out, step: step(out), steps, text)


def cut_tail(start: Callable[[str], int | None]) -> Step:
    """Cut from `start(text)` to the end, again while a new tail starts: a reply may sign twice ("Regards, Dr. X.
    Take care. Dr X, MD")."""

    def step(text: str) -> str:
        kept = text
        while (i := start(kept)) is not None and (shorter := kept[:i].rstrip()) != kept.rstrip():
            kept = shorter
        return text if kept == text.rstrip() else kept + _CUT

    return step


# --- when a match is boilerplate (the rules' own checks) ---------------------------------------------------------
def _clause_end(phrase: str, rest: str) -> bool:
    """`phrase` ends its clause: punctuation at its end, or `rest` (the text after it) starts with a newline or a
    run-on capital ("helps.Take"), or is empty."""
    return bool(re.search(r"[.!?,;:]\s*$", phrase)) or not rest or bool(re.match(r"\s*(?:\n|[A-Z])", rest))


_HOPE_KEY = re.compile(
    r"help|answer|resolv|address|satisf|clear|clarif|useful|solv|informative|explained|take\s+care|\bok\b|okay|guide",
    re.I,
)


def _hope_clause(m: re.Match[str]) -> str:
    """The phrase unless it goes on with advice ("I hope this would be helpful in managing the pain"). The filler words
    may run on into the next sentence ("HOPE THIS HELPS Take care All the best"): then the longest prefix that ends a
    clause is the phrase."""
    phrase = m.group()
    for w in reversed(list(re.finditer(r"\w+[\s,.!]*", phrase))):
        head, rest = phrase[: w.end()], phrase[w.end() :] + m.string[m.end() :]
        if _HOPE_KEY.search(head) and _clause_end(head, rest):
            return _CUT + phrase[w.end() :]
    return phrase


# "Feel free to ..." and "don't hesitate to ..." invite the patient back to this doctor ("feel free to ask me at
# HCM for any further queries") or give advice ("don't hesitate to call an ambulance if you have chest pain",
# "feel free to contact your GP tomorrow for a blood test"). The clause is the invitation only when every word
# after the opener is one an invitation is made of: asking, writing back, me/us, further queries, this platform.
_INVITE_OPENER = re.compile(r"(?:feel\s+(?:free|easy)\s+to|hesitate\s+(?:to|in))\s+(.*)", re.I | re.S)
_INVITE_WORDS = frozenset(
    """ask asking contact contacting write writing revert reverting get getting come back post posting discuss
    reach message follow up answer address call me us again anytime any time further more other additional query
    queries question questions doubt doubts concern concerns clarification clarifications clarify detail details
    anything else unclear unanswered if you u have has need needed require required there is are in this that
    regard regards for with to at on through via direct directly the a an of case and or i we will would be glad
    happy pleased help know want wish like it here forum platform site website service portal please also info
    information related regarding your all whenever when any one some something so can may shall them they them
    glad alleviate solve resolve clear thank thanks report reports result results photo photos picture pictures
    image images update updates progress feedback""".split()
)


def _invitation(m: re.Match[str]) -> bool:
    invite = _INVITE_OPENER.search(m.group())
    if not invite:
        return True
    # the clause may stop inside a run-on word ("any other questionKind regards"): finish that word
    rest = invite.group(1) + re.match(r"[a-z]*", m.string[m.end() :]).group()
    rest = re.sub(PLATFORM, " ", rest, flags=re.I)
    return all(w in _INVITE_WORDS for w in re.findall(r"[a-z]+|\d+", rest.lower()))  # not "call 911"


def _wish(m: re.Match[str]) -> bool:
    wish = re.search(r"\byou\b|health|recovery|luck|best", m.group(), re.I)
    return bool(wish) and _clause_end(m.group(), m.string[m.end() :])


# What follows a list of values rather than a phone number: a unit, a dose form, a time span.
_UNIT_AFTER = re.compile(
    r"[ \t]*(?:%|°|(?:mg|ml|mcg|µg|ug|g|gm|gms|kg|lbs?|iu|units?|mm|cm|mmhg|mmol|mg/dl|bpm|times|x|days?|weeks?|"
    r"months?|years?|hrs?|hours?|min(?:ute)?s?|tabs?|tablets?|caps?|capsules?|doses?|drops?|puffs?|cells?|copies|"
    r"per|/)(?![a-z]))",
    re.I,
)


def _phone(m: re.Match[str]) -> bool:
    """A digit run is a phone number when it has 9 to 15 digits (E.164 allows 15), no unit after it, and a phone cue
    before it ("Mob:", "call me on"), a "+" country code, one unbroken run of 10+ digits, or the grouping phone
    numbers are written in (below) with values that are not all round or all years. A reading or dose list ("140 90
    150 95", "250 500 750 1000 mg"), lab counts ("11234 12345 9876"), a range ("100 - 101") or a schedule
    ("200-0-0-1") is not a phone number."""
    num = m.group("num")
    groups = re.findall(r"\d+", num)
    digits = sum(map(len, groups))
    if not 9 <= digits <= 15 or _UNIT_AFTER.match(m.string, m.end()):
        return False
    return bool(m.group("cue") or num.startswith("+") or (len(groups) == 1 and digits >= 10) or _phone_shaped(groups))


def _phone_shaped(groups: list[str]) -> bool:
    """The digit groups are written the way phone numbers are: 98450 12345, 022 24142841, 555-123-4567,
    020 7946 0958, 0161 496 0000, 1-800-555-1234; but 250 500 1000 and 2014 2015 2016 are values."""
    n = tuple(map(len, groups))
    two = len(n) == 2 and 2 <= n[0] <= 5 <= n[1] <= 8  # area or operator code, then the number
    three = len(n) == 3 and n[2] == 4 and {3, 4} >= set(n[:2])
    four = len(n) == 4 and n[0] <= 3 and n[1:] == (3, 3, 4)  # a country code first
    values = all(g[-1] in "05" for g in groups) or all(re.fullmatch(r"(?:19|20)\d\d", g) for g in groups)
    return (two or three or four) and not values


# --- the rules ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """One cleaning rule: what it `does` to the `fields` it cleans (a step built by cut, cut_phrase, replace or
    cut_tail), then the tidy-up joins what is left around each cut. `cuts` maps text it must change to what
    clean_text returns for it; `keeps` holds text it must leave as it is. tests/test_cleaning.py runs both on the
    doctor's reply when the rule cleans it, else on the rule's first field."""

    name: str
    does: Step
    cuts: Mapping[str, str]
    keeps: tuple[str, ...]
    fields: tuple[str, ...] = ("doctor",)
    tidy: bool = True


# Patients don't write platform boilerplate, and their "Dr." is a greeting: most rules clean the doctor's reply
# alone. Links and addresses go from every field; the platform's chat prompt stands in the patient's message only.
EVERY_FIELD = ("description", "patient", "doctor")

# Order matters: links and addresses first (a sign-off often ends in one), then the phrases, then any platform name
# left, then the sign-off block at the end.
RULES = [
    Rule(
        "whitespace",
        whitespace,
        fields=EVERY_FIELD,
        cuts={
            "Rest\u00a0well.\tDrink  water.\r\nSee a GP.\n\n\n\nSoon.\n": "Rest well. Drink water.\nSee a GP.\n\nSoon."
        },
        keeps=("Rest well.\n\nSee a GP.",),
        tidy=False,  # it is the tidy-up's own first step
    ),
    # Links. A link starts after anything but a letter, digit, "@" or "/" (a space, a quote, a bracket, "see:", a
    # glued sentence end "it.www..."): with www., a scheme, a shortener, or a bare domain followed by a path
    # ("healthcaremagic.com/questions/123"). It ends before closing punctuation and a space, or a run-on capital.
    # The words that introduce a link or an address go in the tidy-up (_INTRO).
    Rule(
        "urls",
        cut(
            r"(?<![\w@/])(?:https?://|www\.|(?:bit\.ly|goo\.gl|tinyurl\.com|t\.co)/"
            r"|(?-i:(?![a-z0-9-]+\.(?:www|https?)\b)[a-z0-9][a-z0-9-]*(?:\.[a-z0-9-]+)*\.(?:com|org|net|edu|gov|info|in|uk|io|co)(?=/)))"
            r"[^\s]+?(?=[.,;:!?)\]\"'’”>]*(?:\s|$)|(?-i:[A-Z][a-z][^\s/?=&#%]*(?:\s|$)))"
        ),
        fields=EVERY_FIELD,
        cuts={
            "Read about it (https://example.org/acne?id=3). Then rest, at www.x.org, daily.": (
                "Read about it. Then rest, daily."
            )
        },
        keeps=("The scan (MRI/CT) is normal.",),
    ),
    Rule(
        "emails",
        cut(
            r"(?:(?:my\s+)?e?-?mail(?:\s+(?:me|us|id))?(?:\s+(?:at|in|to|on))?\s*[:\-]?\s*|write\s+down\s+to\s*)?"
            r"\(?[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.(?:com|org|net|in|co|edu|gov|info|uk|us|ca|au)(?-i:(?=[^a-z]|$))\)?"
        ),
        fields=EVERY_FIELD,
        cuts={"Send the photos to me at dr.someone@example.com and rest.": "Send the photos to me and rest."},
        keeps=("Mail the report to your GP.",),
    ),
    # A run of digits and phone separators, cut when _phone finds it shaped like a phone number.
    Rule(
        "phones",
        cut(
            r"(?P<cue>(?<![\w])(?:mob(?:ile)?|ph(?:one)?|tel(?:ephone)?|cell|contact|call|whats\s?app|helpline|fax)"
            r"(?:\s*(?:no\.?|number|#))?(?:\s+(?:me|us))?(?:\s+(?:at|on))?\s*[:\-.]?\s*)?"
            r"(?<![\w.+])(?P<num>\+?\(?\d(?:(?:[ \t]*[()\-][ \t]*|[ \t]+|\.(?=\d))?\d)*\)?)",
            when=_phone,
        ),
        fields=EVERY_FIELD,
        cuts={"Rest and fluids. Dr. M R Puhan Mob: 9437873112": "Rest and fluids."},
        keeps=(
            "Take 400-600 mg ibuprofen every 8 hours.",
            "Fever of 100 - 101 for 2 days. Take Susten 200-0-0-1 on 8-10-2014.",
            "The scans of 2014 2015 2016 were normal; the counts were 500 1000 2500.",
        ),
    ),
    # iCliniq's link to its paid service: "For more information consult a urologist online -->". The arrow ends the
    # advert; a real instruction before it ("Revert back after three weeks to a dermatologist online -->") keeps its
    # words and loses only "online -->".
    Rule(
        "arrows",
        in_turn(
            cut(
                r"(?<![\w])for\s+(?:more|further)\s+(?:information|info|queries|details)\s+consult\s+(?:a|an)\s+"
                r"[^.!?\n]{0,60}?\s*online\s*\.?\s*-+\s*>"
            ),
            replace(r"(?:\s+online)?\s*\.?\s*-+\s*>+\s*", lambda m: _CUT if m.group().strip() else " "),
        ),
        fields=EVERY_FIELD,
        cuts={
            "Wash it. For further information consult a dermatologist online -->": "Wash it.",
            "Revert after three weeks to a dermatologist online -->": "Revert after three weeks to a dermatologist.",
        },
        keeps=("Use it twice - morning and night.",),
    ),
    # "Welcome to HCM", "Well come to the HCM", "Hello and welcome...", "Welcome HCM!"; a bare "welcome" is
    # boilerplate only as the opening: "Hello and welcome...", "Hi, welcome."
    Rule(
        "welcome",
        in_turn(
            cut_phrase(
                r"(?:(?:(?:thanks?|thank\s+you)\s+and\s+|and\s+|i\s+)?(?:a\s+)?(?:warm\s+)?(?:well\s*come|welcome)"
                rf"(?:\s+you)?(?:\s+(?:back\s+)?(?:here\s+)?(?:to|t|at|on|in)\s+(?:the\s+)?(?:{PLATFORM}|{_SITE})"
                rf"|\s+{PLATFORM})|greetings\s+from\s+(?:the\s+)?{PLATFORM})"
                rf"(?:\s*\.?\s*(?:thanks?|thank\s+you)\s+for\s+(?:calling|using|choosing)\s+{PLATFORM})?"
                rf"(?:[\s,.!]*greetings\s+of\s+the\s+day)?",
                greeting=True,
            ),
            cut(
                re.compile(
                    rf"^{_GREETING}(?:and\s+)?(?:well\s*come|welcome)(?:\s+back)?(?=\s*(?:[.!,]|$)){_END}", re.I | re.M
                )
            ),
        ),
        cuts={
            "Hello, welcome to Chat Doctor. Your fever is likely viral.": "Your fever is likely viral.",
            "Hi, welcome. Rest the knee.": "Rest the knee.",
        },
        keeps=("Hello, your fever is viral. Rest.", "You are welcome to bring your reports."),
    ),
    # "Thanks for your query", "Thank you for asking at HCM", "thank you for writing to us", "Thanks for posting
    # your concern in the HCM", "Thank you for providing the brief history".
    Rule(
        "thanks_for_query",
        cut_phrase(
            r"(?:(?:well\s*come|welcome)[\s,.!]*)?(?:many\s+|and\s+)?(?:thanks?|thank\s*(?:s|you)|than\s+you)"
            r"(?:\s+(?:so|very)\s+much|\s+a\s+lot)?\s*(?:for|to)\s+(?:(?:using|choosing|contacting|contact|giving|"
            r"asking|posting|writing(?:\s+in)?|calling|consulting|coming|trusting|visiting|sharing|providing|the|"
            rf"your|this|putting|submitting|raising|bringing)|{_TOPIC})(?:\s+(?:us|me)|\s*{PLATFORM})?"
            rf"(?:\s+(?:{_OBJ}\s+)?(?:[a-z]+\s+)?{_TOPIC}(?:\s+of\s+(?:you(?![a-z])|(?:your|the)\s+[a-z]+))?)?"
            rf"(?:\s+(?:to|at|on|in|with|through|from|via|under|here)\s*(?:the\s+)?(?:us|{PLATFORM}|{_SITE}))?"
            rf"(?:\s+{_SITE})?{_PREP_PLATFORM}(?:\s+for\s+(?:posting|asking|sharing)\s+(?:{_OBJ}\s+)?{_TOPIC})?",
            greeting=True,
        ),
        cuts={
            "Hello,Thanks for the query.I would suggest an X-ray.It may be a hairline fracture.": (
                "I would suggest an X-ray.It may be a hairline fracture."
            ),
            "Rest and fluids help. Thank you for choosing iCliniq.": "Rest and fluids help.",
        },
        keeps=("Thank your GP for the referral.",),
    ),
    # Template openers that describe the platform's process, not the patient: "I have reviewed your query and here
    # is my advice" ('Ask A Doctor' service).
    Rule(
        "template",
        cut_phrase(
            r"i\s+have\s+(?:reviewed|read|gone\s+through)\s+(?:your|the)\s+[\w'’\s]{0,30}?"
            r"(?:query|question|history|concerns?|case|details)\s+and\s+here\s+is\s+my\s+advice"
        ),
        cuts={"I have reviewed your query and here is my advice. Rest.": "Rest."},
        keeps=("I have reviewed your reports: the thyroid is normal.",),
    ),
    # "Wish you good health", "Wishing you a speedy recovery", "Wish you the best of the health".
    Rule(
        "wishes",
        cut(
            rf"{_START}(?:i\s+)?(?:wish(?:ing)?)\s+(?:you\s+)?(?:(?:a|an|the|all|very|good|best|of|speedy|quick|"
            r"early|rapid|healthy|and|happy|great|sound|health|recovery|luck|wonderful|have|ahead|always|life|for|"
            r"baby|future|your|child|son|daughter|mother|father|wife|husband|kid|&|fast|blessed)"
            r"(?:\b|(?<=&)|(?-i:(?<=[a-z])(?=[A-Z])))\s*){1,10}(?=[\s.!,]|$|(?-i:[A-Z]))"
            rf"(?:\s*(?:at|on|from|in)\s+(?:the\s+)?{PLATFORM})?[.!,]*",
            when=_wish,
        ),
        cuts={"Rest well. Wish you good health.": "Rest well."},
        keeps=("If you wish to have a baby, stop the pill.",),
    ),
    # "Hope this helps", "Hope I have answered your query", "Hope your concern has been resolved", "I hope this is
    # helpful", "Hope our answers satisfy your need": a run of filler words after "hope" that holds one of the key
    # words (_HOPE_KEY) and ends its clause. Bounded to a clause: no full stop inside.
    Rule(
        "hope_this_helps",
        replace(
            rf"{_START}(?:i\s+|we\s+)?(?:hope|hopefully)(?:\s+(?:"
            r"this|that|it|i|we|my|our|the|above|information|info|answer|answers|reply|replies|suggestions?|advice|"
            r"have|has|had|was|is|will|would|be|been|am|were|are|able|to|of|for|you|your|concerns?|quer(?:y|ies)|"
            r"questions?|doubts?|all|fully|well|some|way|in|any|clears?|cleared|solves?|solved|helps?|helped|helpful|"
            r"answered|addressed|resolved|satisfy|satisfies|satisfied|need|needs|facts|useful|take|care|ok|okay|"
            r"successfully|adequately|clarified|clarify|informative|and|could|can|sufficiently|provided|given|"
            r"explained|much|issue|problem|may|find|guides?|managed|with|qwery"
            rf")(?:\b|(?-i:(?<=[a-z])(?=[A-Z]))))+(?:\s*[,.!]*\s*(?:do\s+)?write\s+back)?{_END}",
            _hope_clause,
        ),
        cuts={
            "Apply the gel twice daily.Hope this helps.If it is so, stop it.": (
                "Apply the gel twice daily. If it is so, stop it."
            ),
            "Drink fluids. Hope this will take care of your query.Thank youDr Y": "Drink fluids.",
        },
        keeps=("I hope the antibiotics help with the pain. Rest.",),
    ),
    # "Let me know if I can assist you further", "feel free to ask at HCM", "do not hesitate to contact me", "Should
    # you have any further query, please ...", "For further questions, you may contact me", "you can ask a direct
    # question to me on this forum, following the below link". "Feel free to"/"don't hesitate to" clauses go only
    # when they invite the patient back (_invitation).
    Rule(
        "contact_me",
        cut(
            rf"{_START}(?:(?:but\s+|and\s+|so\s+)?(?:(?:if|in\s+case|should|incase)\s+(?:of\s+)?(?:you\s+)?(?:have\s+|need\s+|require\s+)?"
            rf"(?:any\s+)?{_FURTHER}?\s*(?:quer(?:y|ies)|questions?|doubts?|clarifications?|assistance|help|information|anything\s+else(?:\s+to\s+ask)?)"
            rf"(?:\s+(?:or|and)\s+{_FURTHER}?\s*(?:quer(?:y|ies)|questions?|doubts?))?"
            rf"(?:\s+in\s+this\s+regard)?|for\s+(?:any\s+)?{_FURTHER}\s+(?:quer(?:y|ies)|questions?|doubts?|clarifications?))"
            rf"\s*,?\s*(?:then\s+)?(?:please\s+|you\s+(?:can|may)\s+|kindly\s+)?)?"
            rf"(?:(?:please\s+)?(?:do\s+)?(?:let\s+(?:me|us)\s+know\s+if\s+(?:i|we)\s+can\s+(?:assist|help)\s+you(?:\s+further)?"
            rf"|let\s+(?:me|us)\s+know\s+if\s+you\s+have\s+any\s+{_FURTHER}?\s*(?:quer(?:y|ies)|questions?|doubts?)"
            rf"|feel\s+(?:free|easy)\s+to\s+(?:ask|contact|write|revert|get\s+back|come\s+back|post|discuss|reach|message|follow\s+up){_to_clause_end(60)}"
            rf"|(?:do\s+not|don'?t|never)\s+hesitate\s+(?:to|in)\s+{_to_clause_end(60)}"
            rf"|(?:(?:please|kindly)\s+)?(?:you\s+(?:can|may)\s+)?(?:contact|write\s+(?:back\s+)?to|ask)\s+(?:me|us)(?:\s+(?:directly|again|back|anytime))?"
            rf"(?:\s+(?:on|at|through|via)\s+(?:this\s+(?:forum|platform|site|website)|{PLATFORM}))?"
            rf"(?=\s*(?:[.!?\n]|$)|\s*(?-i:[A-Z]))"
            rf"|(?:if|in\s+case)\s+(?:of\s+)?(?:you\s+have\s+)?(?:any\s+)?{_FURTHER}\s+(?:quer(?:y|ies)|questions?)(?=\s*,?\s*(?:dr\b|$))"
            rf"|(?:please\s+)?(?:get|come|write)\s+back(?:\s+to\s+(?:me|us))?\s+(?:if|in\s+case)\s+you\s+(?:require|need|have)\s+"
            rf"(?:any\s+)?{_FURTHER}?\s*(?:information|quer(?:y|ies)|questions?|help|assistance|clarifications?)"
            rf"|(?:i\s+)?(?:would|will|shall)\s+be\s+(?:happy|glad|pleased)\s+to\s+(?:help|assist|answer){_to_clause_end(120)}"
            rf"|(?:you\s+are\s+(?:most\s+|always\s+)?)?welcome\s+(?:for|with)\s+(?:any\s+)?{_FURTHER}?\s*(?:quer(?:y|ies)|questions?|doubts?|assistance|help){_to_clause_end(40)}"
            rf"|(?:any\s+)?{_FURTHER}\s+(?:clarifications?|quer(?:y|ies)|questions?)\s+(?:are|is)\s+(?:most\s+|always\s+)?welcome"
            rf"|(?:you\s+can\s+)?ask\s+me\s+(?:a\s+|any\s+)?(?:direct\s+)?{_FURTHER}?\s*(?:quer(?:y|ies)|questions?){_to_clause_end(60)}"
            rf"|(?:you\s+(?:may|can)\s+)?(?:write|get|come)\s+back\s+(?:to\s+(?:me|us)\s+)?(?:if|in\s+case\s+of|with|for)\s+"
            rf"(?:you\s+have\s+)?(?:any\s+|more\s+|further\s+|other\s+)?(?:concerns?|quer(?:y|ies)|questions?|doubts?)(?![a-z])"
            rf"|(?:i\s+(?:am|remain)\s+)?at\s+your\s+disposal{_to_clause_end(80)}"
            rf"|(?:you\s+can\s+)?reach\s+me\s+directly{_to_clause_end(60)}"
            rf"|(?:you\s+can\s+)?ask\s+a\s+direct\s+question\s+to\s+me{_to_clause_end(80)}))"
            rf"{_END}",
            when=_invitation,
        ),
        cuts={"Rest the knee. Don't hesitate to ask me at HCM if you have more questions.": "Rest the knee."},
        keeps=("Your ECG is normal. Don't hesitate to call an ambulance if you have chest pain.",),
    ),
    # "Kindly spare some time to rate my answer", "please rate/accept this answer".
    Rule(
        "rate_answer",
        cut_phrase(
            r"(?:kindly|please)\s+(?:spare\s+some\s+time\s+to\s+)?(?:rate|accept|review)\s+(?:my|this|the)\s+"
            r"(?:answer|reply)[^.!?\n]*"
        ),
        cuts={"Rest. Kindly spare some time to rate my answer.": "Rest."},
        keeps=("Please rate your pain from 1 to 10 each day.",),
    ),
    # A platform name inside a link the link rule did not take ("healthcaremagic.com/questions/123") takes the whole
    # link with it: cutting the name alone would leave "www./questions/123". A platform name left inside a sentence
    # goes with its preposition ("In my experience at HCM this heals").
    Rule(
        "platform_name",
        in_turn(
            cut(
                rf"[^\s\"'<>()\[\]]*?(?:{PLATFORM})[^\s\"'<>()\[\]]*",
                when=lambda m: re.search(r"/|www\.|\.(?:com|org|net)", m.group(), re.I),
            ),
            cut(
                r"(?<![\w])(?:(?:(?:here\s+)?(?:at|on|to|in|from|with|through|via|using|of)\s+(?:the\s+)?)?)"
                rf"[\"'‘“]?{PLATFORM}(?:'s)?[\"'’”]?"
            ),
        ),
        cuts={
            "In my experience at ChatDoctor this heals well.": "In my experience this heals well.",
            "Hi, welcome to HCM. HCM is hypertrophic cardiomyopathy? No: rest.": (
                "Is hypertrophic cardiomyopathy? No: rest."
            ),
        },
        keeps=("HCG levels double every two days.",),
    ),
    # The sign-off block at the end of the reply, found by its shape (_signoff_start).
    Rule(
        "signoff",
        cut_tail(_signoff_start),
        cuts={
            "Use a mild soap.Best wishes,Dr Sudhir Kumar Md DM (Neurology)Senior Consultant Neurologist": (
                "Use a mild soap."
            ),
            "Avoid scratching.Thanks.Dr.Harshit Bhachech.MBBS, DDVL.": "Avoid scratching.",
            "Rest well. Regards, Dr. X, General Surgeon": "Rest well.",
        },
        keeps=(
            "If the pain persists, see your Dr. soon.",
            "Please see Dr. Smith tomorrow for a check.",
            "If the rash spreads, see Dr. Rao",
            "Thank you. Use Betadine and Ice.",
        ),
    ),
    # The Q&A platform's own chat prompt, captured at the start of some patients' messages: "Hi, may I answer your
    # health queries right now ? Please type your query here." (at the start, or after the question's title). What
    # stands around it is the patient's.
    Rule(
        "platform_prompt",
        cut(
            r"(?:^\W*|(?<=[.?!])\s*)(?:hi\b\W*)?(?:\w{0,5}\s+){0,2}i\s+answer\s+your\s+health\s+quer(?:y|ies)\s+"
            r"right\s+now\W*(?:please\s+)?type\s+your\s+quer(?:y|ies)\s+here\W*"
        ),
        fields=("patient",),
        cuts={
            "My cough began in May. Hi, may I answer your health queries right now ? Please type your query here.": (
                "My cough began in May."
            )
        },
        keeps=("Can you answer my query about my cough?",),
    ),
]
RULE_NAMES = [rule.name for rule in RULES]


def clean_text(text: Any, field: str = "doctor", changed: Counter | None = None) -> str:
    """Apply every rule in order; return the cleaned text, counting in `changed` ("field.rule") the rules that fired.

    A rule that fires on text another rule already emptied is not counted.
    """
    text = "" if text is None else str(text)
    for rule in RULES:
        if field not in rule.fields:
            continue
        out = rule.does(text)
        if out == text:
            continue
        new = _finish(_tidy(out), text) if rule.tidy else out
        if new != text and changed is not None:
            changed[f"{field}.{rule.name}"] += 1
        text = new
    return text
