"""Guards that refuse a semantic-cache hit between two similar messages that do not mean the same thing.

Sentence embeddings score "How do I sort a list ascending?" and "How do I sort a list descending?" as near
duplicates; serving one's answer for the other is a wrong answer. Each guard extracts a feature that a
paraphrase keeps and a near-miss changes, and refuses when the two messages' features differ:

- ``code``: text in backticks (inline or fenced) or quotes must match exactly (as a set of spans);
- ``negation``: the count of negations (not, no, never, n't, without, none, neither, nor, ...) must agree in
  presence and parity;
- ``number``: the numbers (digits, number words like "twenty-five", "a dozen", "half", ordinals) must be
  the same set;
- ``unit``: the units of measure and currencies (km vs miles, seconds vs minutes, $ vs €) must be the same set;
- ``comparison``: where both messages use a comparison of one kind (more/less, larger/smaller, before/after,
  faster/slower, better/worse, ascending/descending, longer/shorter), they must use the same side. Words that
  mostly name a turn or a place rather than a direction (previous, last, first, next, earlier, above, under)
  are left to the ``slot`` guard, which sees where they stand;
- ``entity``: every named entity (acronym, CamelCase, capitalised word that is not a common word and not merely
  the first word of a sentence) of one message must appear in the other, in any case, spelling (analyse /
  analyze) or inflection (China / Chinese, B / B's);
- ``slot``: the two messages must not be one template with a different filler. Their lower-cased word sequences
  are aligned (difflib); when they differ in at most ``SLOT_MAX_HUNKS`` hunks of at most ``SLOT_MAX_WORDS``
  words, and some hunk adds, drops or swaps a content word (not a function word, not the same stem, spelling
  variant or generic equivalent: response / answer / reply), the guard refuses ("... business in Japan?" /
  "... in Brazil?", "time complexity" / "space complexity"). A wide rewording, or a minimal edit of function
  words only ("What about when" / "And what if"), passes. It looks at the whole text, so it also catches an
  edit at the end of a long prompt that the embedding (which reads 256 word pieces) does not see. Its cost:
  a paraphrase that swaps a single synonym ("doctor" / "physician") is refused.

``refusal(earlier, later)`` is pure and symmetric (``refusal(a, b) == refusal(b, a)``), case- and
punctuation-tolerant where paraphrases differ, and returns the first refusing guard in ``GUARDS`` order.
Text inside code spans is checked only by the ``code`` guard (once the spans match, they are removed before
the other guards look).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from difflib import SequenceMatcher

GUARDS: tuple[str, ...] = ("code", "negation", "number", "unit", "comparison", "entity", "slot")

# --- text normalisation -------------------------------------------------------------------------------------

_QUOTE_MAP = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u00b4": "'", "`": "`"})
_FENCED = re.compile(r"```.*?(?:```|$)", re.S)
_INLINE = re.compile(r"`([^`\n]+)`")
_DOUBLE = re.compile(r'"([^"\n]+)"')
_SINGLE = re.compile(r"(?<![\w'])'([^'\n]+?)'(?![\w'])")
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[A-Za-z]+(?:'[A-Za-z]+)*|[$\u20ac\u00a3\u00a5%<>]=?|[.!?;:]")


def _normalise(text: str) -> str:
    return str(text).translate(_QUOTE_MAP)


def _split_code(text: str) -> tuple[frozenset[str], str]:
    """(the set of code / quoted spans, the text without them)."""
    spans: list[str] = []

    def take(match: re.Match[str]) -> str:
        body = match.group(0)
        if body.startswith("```"):
            body = body[3:]
            if body.endswith("```"):
                body = body[:-3]
            # NOTE: a fence's language tag ("```python") is not code; drop a first line that is a bare word.
            first, _, rest = body.partition("\n")
            if rest and re.fullmatch(r"[\w+-]*", first.strip()):
                body = rest
        else:
            body = match.group(1)
        spans.append(body.strip())
        return " . "

    text = _FENCED.sub(take, text)
    text = _INLINE.sub(take, text)
    text = _DOUBLE.sub(take, text)
    text = _SINGLE.sub(take, text)
    return frozenset(s for s in spans if s), text


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


# --- negation -----------------------------------------------------------------------------------------------

_NEGATIONS = frozenset(
    "not no never none nobody nothing nowhere neither nor without cannot dont doesnt didnt isnt arent wasnt "
    "werent cant couldnt wouldnt shouldnt wont hasnt havent hadnt aint mustnt neednt".split()
)


def _negations(words: list[str]) -> int:
    return sum(1 for w in words if w in _NEGATIONS or w.endswith("n't"))


# --- numbers ------------------------------------------------------------------------------------------------

_UNITS_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "dozen": 12,
}
_TENS_WORDS = {
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
}
_SCALE_WORDS = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
_FRACTION_WORDS = {"half": "0.5", "quarter": "0.25", "twice": "x2", "thrice": "x3"}
_ORDINAL_WORDS = {
    "first": 1, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8, "ninth": 9,
    "tenth": 10, "eleventh": 11, "twelfth": 12, "twentieth": 20, "hundredth": 100,
}
_ORDINAL_SUFFIX = re.compile(r"(\d+)(st|nd|rd|th)$")
# NOTE: "one" is a pronoun after these words ("which one", "how does one"); as such it is not a number.
_PRONOUN_ONE_BEFORE = frozenset(
    "which this that the each any every some another no does do can could should would will a little last next "
    "right wrong new old other such".split()
)


def _numbers(tokens: list[str]) -> frozenset[str]:
    """Canonical numbers: integers as decimal strings, decimals / versions as written, ordinals as 'ordN'."""
    found: set[str] = set()
    words = [t.lower() for t in tokens]
    i = 0
    while i < len(words):
        w = words[i]
        if w[0].isdigit():
            plain = w.replace(",", "") if re.fullmatch(r"\d{1,3}(,\d{3})+", w) else w
            if re.fullmatch(r"\d+", plain):
                found.add(str(int(plain)))
            else:
                found.add(plain)
            i += 1
            continue
        suffix = _ORDINAL_SUFFIX.match(w)
        if suffix:
            found.add(f"ord{int(suffix.group(1))}")
            i += 1
            continue
        if w in _ORDINAL_WORDS:
            found.add(f"ord{_ORDINAL_WORDS[w]}")
            i += 1
            continue
        if w in _FRACTION_WORDS:
            found.add(_FRACTION_WORDS[w])
            i += 1
            continue
        if w in _UNITS_WORDS or w in _TENS_WORDS or w in _SCALE_WORDS:
            if w == "one" and i > 0 and words[i - 1] in _PRONOUN_ONE_BEFORE:
                i += 1
                continue
            total, current, j = 0, 0, i
            while j < len(words):
                x = words[j]
                if x in _UNITS_WORDS:
                    current += _UNITS_WORDS[x]
                elif x in _TENS_WORDS:
                    current += _TENS_WORDS[x]
                elif x in _SCALE_WORDS:
                    scale = _SCALE_WORDS[x]
                    current = max(current, 1) * scale
                    if scale >= 1000:
                        total, current = total + current, 0
                elif x == "and" and j + 1 < len(words) and words[j + 1] in _UNITS_WORDS.keys() | _TENS_WORDS.keys():
                    pass
                else:
                    break
                j += 1
            found.add(str(total + current))
            i = j
            continue
        i += 1
    return frozenset(found)


def _is_number_token(word: str) -> bool:
    return word[0].isdigit() or word in _UNITS_WORDS or word in _TENS_WORDS or word in _SCALE_WORDS


# --- units --------------------------------------------------------------------------------------------------

_UNIT_FAMILIES: dict[str, tuple[str, ...]] = {
    "mm": ("mm", "millimeter", "millimeters", "millimetre", "millimetres"),
    "cm": ("cm", "centimeter", "centimeters", "centimetre", "centimetres"),
    "m": ("meter", "meters", "metre", "metres"),
    "km": ("km", "kilometer", "kilometers", "kilometre", "kilometres", "kms"),
    "inch": ("inch", "inches", "in."),
    "foot": ("foot", "feet", "ft"),
    "yard": ("yard", "yards", "yd"),
    "mile": ("mile", "miles", "mi"),
    "mg": ("mg", "milligram", "milligrams"),
    "g": ("gram", "grams", "gramme", "grammes"),
    "kg": ("kg", "kilogram", "kilograms", "kilo", "kilos", "kgs"),
    "pound": ("pound", "pounds", "lb", "lbs", "\u00a3", "gbp"),
    "ounce": ("ounce", "ounces", "oz"),
    "ton": ("ton", "tons", "tonne", "tonnes"),
    "l": ("liter", "liters", "litre", "litres"),
    "ml": ("ml", "milliliter", "milliliters", "millilitre", "millilitres"),
    "gallon": ("gallon", "gallons", "gal"),
    "ns": ("ns", "nanosecond", "nanoseconds"),
    "us": ("microsecond", "microseconds"),
    "ms": ("ms", "millisecond", "milliseconds", "msec"),
    "s": ("second", "seconds", "sec", "secs"),
    "min": ("minute", "minutes", "mins"),
    "h": ("hour", "hours", "hr", "hrs"),
    "day": ("day", "days"),
    "week": ("week", "weeks"),
    "month": ("month", "months"),
    "year": ("year", "years", "yr", "yrs"),
    "bit": ("bit", "bits"),
    "byte": ("byte", "bytes"),
    "kb": ("kb", "kilobyte", "kilobytes", "kib", "kibibyte", "kibibytes"),
    "mb": ("mb", "megabyte", "megabytes", "mib", "mebibyte", "mebibytes"),
    "gb": ("gb", "gigabyte", "gigabytes", "gib", "gibibyte", "gibibytes"),
    "tb": ("tb", "terabyte", "terabytes", "tib"),
    "celsius": ("celsius", "centigrade", "\u00b0c"),
    "fahrenheit": ("fahrenheit", "\u00b0f"),
    "kelvin": ("kelvin", "kelvins"),
    "dollar": ("dollar", "dollars", "$", "usd", "bucks"),
    "euro": ("euro", "euros", "\u20ac", "eur"),
    "yen": ("yen", "\u00a5", "jpy"),
    "percent": ("percent", "percentage", "%", "pct"),
    "hz": ("hz", "hertz"),
    "khz": ("khz", "kilohertz"),
    "mhz": ("mhz", "megahertz"),
    "ghz": ("ghz", "gigahertz"),
    "mph": ("mph",),
    "kph": ("kph", "kmh"),
    "watt": ("watt", "watts", "w"),
    "kw": ("kw", "kilowatt", "kilowatts"),
    "volt": ("volt", "volts", "v"),
}
_UNIT_OF = {form: canon for canon, forms in _UNIT_FAMILIES.items() for form in forms}
# NOTE: a unit word that is also an ordinary word ("second", "day", "in", "m", "w", "min") counts only next to a
# number ("5 m", "a day", "per second"); long unit names and symbols count anywhere.
_UNIT_ALWAYS = frozenset(
    form for form in _UNIT_OF
    if len(form) >= 5 and form not in {"second", "seconds", "minute", "minutes", "month", "months", "pound", "pounds"}
) | frozenset({"$", "\u20ac", "\u00a3", "\u00a5", "%", "km", "kg", "mph", "kph", "ghz", "mhz", "khz"})
_UNIT_CONTEXT = frozenset({"per", "every", "each", "many", "few", "several", "a", "an"})
_UNIT_SPLIT = re.compile(r"^(\d+(?:[.,]\d+)*)([a-z%]+)$")


def _units(tokens: list[str]) -> frozenset[str]:
    found: set[str] = set()
    words = [t.lower() for t in tokens]
    for i, w in enumerate(words):
        glued = _UNIT_SPLIT.match(w)
        if glued and glued.group(2) in _UNIT_OF:  # "5kg", "10ms"
            found.add(_UNIT_OF[glued.group(2)])
            continue
        canon = _UNIT_OF.get(w)
        if canon is None:
            continue
        prev = words[i - 1] if i else ""
        if w in _UNIT_ALWAYS or (prev and (_is_number_token(prev) or prev in _UNIT_CONTEXT)):
            found.add(canon)
    return frozenset(found)


# --- comparisons --------------------------------------------------------------------------------------------

_COMPARISONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "magnitude": (
        ("more", "most", "larger", "largest", "bigger", "biggest", "greater", "greatest", "higher", "highest",
         "max", "maximum", "maximal", "maximise", "maximize", "exceeds", "exceed", "upper", "uppercase",
         "increase", "increases", "increasing", "increment", "heavier", "taller", "wider", "deeper", ">", ">="),
        ("less", "least", "fewer", "fewest", "smaller", "smallest", "lesser", "lower", "lowest", "min", "minimum",
         "minimal", "minimise", "minimize", "lowercase", "decrease", "decreases", "decreasing",
         "decrement", "lighter", "shorter", "narrower", "shallower", "<", "<="),
    ),
    "time": (
        ("before", "earliest", "older", "oldest"),
        ("after", "latest", "newer", "newest"),
    ),
    "speed": (("faster", "fastest", "quicker", "quickest"), ("slower", "slowest")),
    "quality": (("better", "best", "improve", "improves"), ("worse", "worst", "degrade", "degrades")),
    "order": (("ascending", "asc"), ("descending", "desc", "reverse", "reversed")),
    "length": (("longer", "longest"), ("shorter", "shortest")),
    "sign": (("positive",), ("negative",)),
    "truth": (("true",), ("false",)),
}
# NOTE: "shorter" is both magnitude- and length-negative; it lives in both groups on purpose.
_SIDE_OF: dict[str, list[tuple[str, int]]] = {}
for _group, (_plus, _minus) in _COMPARISONS.items():
    for _w in _plus:
        _SIDE_OF.setdefault(_w, []).append((_group, +1))
    for _w in _minus:
        _SIDE_OF.setdefault(_w, []).append((_group, -1))


def _comparisons(tokens: list[str]) -> dict[str, frozenset[int]]:
    sides: dict[str, set[int]] = {}
    for w in tokens:
        for group, side in _SIDE_OF.get(w.lower(), ()):
            sides.setdefault(group, set()).add(side)
    return {g: frozenset(s) for g, s in sides.items()}


# --- named entities -----------------------------------------------------------------------------------------

# Common words that start sentences and prompts (questions, auxiliaries, pronouns, determiners, imperatives);
# capitalised, they are not names. Lower-case comparison.
_COMMON = frozenset(
    """
    a an the this that these those there here it its it's i i'm i've i'd me my we our us you your he she they
    them their his her what what's which who whom whose when where why how whats hows is are was were be been
    being am do does did done can could should would will shall may might must have has had having if then
    else so but and or also as at by for from in into of on onto to with within about above across after
    again against all any both each either every few many more most much other some such than too very
    just only own same not no nor yes ok okay please thanks thank hi hello hey dear
    write explain describe give tell show list make create build find get use using compute calculate
    convert implement define compare summarize summarise translate generate fix help check sort return print
    read open run suggest recommend provide answer rewrite refactor add remove delete replace update change
    let lets let's could would now today also however therefore thus hence so yet still next first last
    one two three four five six seven eight nine ten new old good best better simple quick quickly short
    briefly brief in-depth detailed is isn't aren't don't doesn't can't won't
    monday tuesday wednesday thursday friday saturday sunday
    """.split()
)
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:['-][A-Za-z0-9]+)*")
# NOTE: what may stand between a sentence boundary (or the start) and a sentence's first word: spaces, quotes,
# brackets, bullets, list numbers ("1.", "2)", "(a)").
_SENTENCE_START = re.compile(r"(?:^|[.!?:;\n])[\s\"'(\[{*#>\u2013\u2014-]*(?:(?:\d+|[a-z])[.)]\s*)?$")


# --- spelling and stems -------------------------------------------------------------------------------------

# British -> American spellings that the suffix rules below do not cover (generic; none is specific to a prompt).
_SPELLING = {
    "programme": "program", "programmes": "programs", "grey": "gray", "aluminium": "aluminum", "cheque": "check",
    "tyre": "tire", "tyres": "tires", "plough": "plow", "sceptical": "skeptical", "mould": "mold",
    "jewellery": "jewelry", "defence": "defense", "offence": "offense", "licence": "license", "practise": "practice",
    "ageing": "aging", "judgement": "judgment", "enrol": "enroll", "fulfil": "fulfill", "learnt": "learned",
    "spelt": "spelled", "maths": "math", "whilst": "while", "amongst": "among", "towards": "toward",
}
_BRITISH = (
    (re.compile(r"(?<=\w\w)is(e|ed|es|ing|ation|ations|er|ers)$"), r"iz\1"),  # organise(d), organisation
    (re.compile(r"(?<=\w)ys(e|ed|es|ing)$"), r"yz\1"),  # analyse, paralyse
    (re.compile(r"(?<=\w\w\w)our(s|ed|ing|ite|ites|able|ful)?$"), r"or\1"),  # colour, favourite, behaviour
    (re.compile(r"(?<=[^aeiou])tre(s)?$"), r"ter\1"),  # centre, metre, theatre
    (re.compile(r"(?<=\w\w)ogue(s)?$"), r"og\1"),  # catalogue, dialogue
    (re.compile(r"(?<=\w\w\w\w)ell(ed|er|ers|ing)$"), r"el\1"),  # travelled, modelling, labelled
)
_SUFFIXES = ("ations", "ation", "ences", "ence", "ances", "ance", "ments", "ment", "ness", "ities", "ity", "ions",
             "ion", "ingly", "edly", "ings", "ing", "ies", "ied", "ers", "er", "ed", "es", "s", "ly", "e")


def _spelling(word: str) -> str:
    """American spelling of a lower-case word (analyse -> analyze, colour -> color); other words unchanged."""
    word = _SPELLING.get(word, word)
    for pattern, repl in _BRITISH:
        word = pattern.sub(repl, word)
    return word


def _stem(word: str) -> str:
    """A crude stem of a lower-case word (American spelling, possessive and one inflectional suffix dropped):
    responses / response -> respons, analysed / analyzes -> analyz. Used only to test two words for sameness."""
    word = _spelling(word.removesuffix("'s").rstrip("'"))
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            stem = word[: -len(suffix)] + ("y" if suffix in ("ies", "ied") else "")
            if suffix in ("ing", "ings", "ed", "er", "ers") and len(stem) >= 4 and stem[-1] == stem[-2] \
                    and stem[-1] not in "aeiouls":
                stem = stem[:-1]  # beginning -> begin, stopped -> stop
            return stem
    return word


def _same_name(a: str, b: str) -> bool:
    """Two lower-case words name the same thing: equal stems, or one a short extension of the other (China /
    Chinese, Japan / Japanese, Pythagoras / Pythagorean: a common prefix of at least 4 letters that leaves at
    most one letter of the shorter word)."""
    if a == b or _stem(a) == _stem(b):
        return True
    shorter = min(len(a), len(b))
    common = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        common += 1
    return common >= 4 and common >= shorter - 1


def _entities(text: str) -> frozenset[str]:
    """Lower-cased words that look like names: acronyms and CamelCase anywhere; capitalised words that are not
    common words, except at the start of a sentence (where any word is capitalised: "Prove ...", "Analyse ...")
    unless the text also capitalises them mid-sentence. A capitalised word the text also writes in lower case
    is a common word too."""
    found: set[str] = set()
    initial: set[str] = set()
    lower_seen: set[str] = set()
    for match in _WORD.finditer(text):
        word = match.group(0)
        if word.endswith(("'s", "'S")):
            word = word[:-2]
        lower = word.lower()
        if word[0].islower():
            lower_seen.add(lower)
            continue
        inner_caps = sum(1 for c in word[1:] if c.isupper())
        if inner_caps and any(c.islower() for c in word) or sum(c.isupper() for c in word) >= 2:
            found.add(lower)  # acronym (HTTP, USA) or CamelCase / mixed case (PyTorch, iPhone, macOS)
            continue
        if lower in _COMMON or lower.split("'")[0] in _COMMON or lower.split("-")[0] in _COMMON:
            continue
        start = match.start()
        if _SENTENCE_START.search(text[max(0, start - 24):start] if start > 24 else text[:start]) and (
            start > 24 or _SENTENCE_START.search(text[:start])
        ):
            initial.add(lower)
            continue
        found.add(lower)
    return frozenset(e for e in found if e not in lower_seen)


def _words_lower(text: str) -> frozenset[str]:
    words: set[str] = set()
    for match in _WORD.finditer(text):
        w = match.group(0).lower()
        words.add(w)
        words.update(part for part in re.split(r"['-]", w) if part)
    return frozenset(words)


def _entity_missing(entities: Iterable[str], other_words: frozenset[str]) -> bool:
    return any(e not in other_words and not any(_same_name(e, w) for w in other_words) for e in entities)


# --- slot fillers (minimal edits) ---------------------------------------------------------------------------

# Function words: a hunk that adds, drops or swaps only these (and politeness) changes the phrasing, not the
# request ("What about when" -> "And what if"). Lower case, without apostrophes.
_FUNCTION = frozenset(
    """
    a an the this that these those there here it its itself i im ive id me my mine myself we our ours us you
    youre youve your yours yourself he him his she her hers they them their theirs one ones someone something
    anything what whats which who whom whose when where why how hows whether whatever is are was were be been
    being am do does did done doing can could should would will shall may might must have has had having get
    got if then else so but and or also as at by for from in into of on onto to with within about across
    through via per over again just only very really quite rather too even still already now then well
    thus hence therefore however also both each every all any some such same other another more much many
    few several lot lots please kindly thanks thank hi hello hey ok okay let lets like as
    way kind sort bit s t m d ll re ve additionally furthermore moreover besides actually basically
    not no nor never isn aren wasn weren don doesn didn won can couldn wouldn shouldn hasn haven hadn
    """.split()
)
# NOTE: negations are function words here because the negation guard has already compared them.
# Generic equivalences: words that requests use interchangeably (the reply to an earlier turn, the verb that
# frames a writing task, "imagine" / "suppose"). A hunk whose content words differ only within one of these
# groups is not a slot change. Generic on purpose: no entry names a thing a particular prompt is about.
_EQUIVALENT_GROUPS = (
    ("response", "answer", "reply", "output"),
    ("previous", "last", "earlier", "prior", "above"),
    ("rewrite", "rephrase", "reword", "reformulate", "revise", "rework", "redo"),
    # the verb that asks for the answer: "write / give / provide / list / return the ..." ask for the same thing
    ("write", "compose", "draft", "create", "produce", "generate", "craft", "develop", "make", "build", "give",
     "provide", "offer", "share", "suggest", "propose", "list", "show", "tell", "present", "return", "output"),
    ("imagine", "suppose", "pretend", "picture", "assume", "consider"),
    ("use", "utilize", "employ", "apply"),
    ("choose", "pick", "select"),
    ("find", "identify", "determine", "figure", "work", "calculate", "compute", "get"),
    ("help", "assist"),
    ("key", "main", "major", "primary", "principal", "chief"),
    ("big", "large"), ("small", "little"), ("begin", "start"), ("end", "finish"),
)
_GROUP_OF = {_stem(w): i for i, group in enumerate(_EQUIVALENT_GROUPS) for w in group}
# Verbs that frame a question as a request ("Explain what X does" = "What does X do?"): no content of their own.
_FRAME = frozenset(_stem(w) for w in ("explain", "describe", "discuss", "elaborate", "clarify", "outline"))
_SLOT_WORD = re.compile(r"\d+(?:[.,]\d+)*|[a-z]+|[<>]=?|[=!]=|[$\u20ac\u00a3\u00a5%]")
# A minimal edit: at most this many differing hunks, each at most this many words on either side.
SLOT_MAX_HUNKS = 2
SLOT_MAX_WORDS = 6


def _slot_words(text: str) -> list[str]:
    """Lower-case words without punctuation (hyphenated and possessive words split), units in canonical form
    (km = kilometres), number words as digits ("twenty-five" = 25; "one" stays a word: often a pronoun)."""
    out: list[str] = []
    for w in _SLOT_WORD.findall(text.lower()):
        if w in _UNITS_WORDS and w != "one":
            if out and out[-1].isdigit() and int(out[-1]) in _TENS_WORDS.values() and _UNITS_WORDS[w] < 10:
                out[-1] = str(int(out[-1]) + _UNITS_WORDS[w])  # twenty-five
                continue
            w = str(_UNITS_WORDS[w])
        elif w in _TENS_WORDS:
            w = str(_TENS_WORDS[w])
        out.append(_UNIT_OF.get(w, w) if len(w) > 2 else w)
    return out


def _content(words: Iterable[str]) -> list[str]:
    """The content of a hunk: its non-function words, as stems, with equivalent words as one group."""
    out = []
    for w in words:
        if w in _FUNCTION:
            continue
        stem = _stem(w)
        if stem in _FRAME:
            continue
        out.append(f"#{_GROUP_OF[stem]}" if stem in _GROUP_OF else stem)
    return out


def _covered(these: list[str], those: list[str]) -> bool:
    return all(any(w == v or _same_name(w, v) for v in those) for w in these)


def _slot_changed(words_a: list[str], words_b: list[str]) -> bool:
    """True when the two word sequences are one template with a different filler: they differ in at most
    SLOT_MAX_HUNKS short hunks (SLOT_MAX_WORDS words each), and some hunk adds, drops or swaps a content word
    (one that is not a function word, nor the same stem, spelling or generic equivalent of a word on the hunk's
    other side)."""
    if words_a == words_b:
        return False
    # NOTE: the same order of arguments whichever message came first, so the guard is symmetric.
    if words_a > words_b:
        words_a, words_b = words_b, words_a
    matcher = SequenceMatcher(None, words_a, words_b, autojunk=False)
    hunks = [(words_a[i1:i2], words_b[j1:j2]) for op, i1, i2, j1, j2 in matcher.get_opcodes() if op != "equal"]
    if len(hunks) > SLOT_MAX_HUNKS or any(max(len(x), len(y)) > SLOT_MAX_WORDS for x, y in hunks):
        return False  # a wide rewording: not a minimal edit
    for x, y in hunks:
        cx, cy = _content(x), _content(y)
        if not (_covered(cx, cy) and _covered(cy, cx)):
            return True
    return False


# --- the guard function -------------------------------------------------------------------------------------


def refusal(earlier: str, later: str) -> str | None:
    """The name of the first guard (in ``GUARDS`` order) that refuses treating ``later`` as a paraphrase of
    ``earlier``, or None when every guard accepts. Pure and symmetric."""
    code_a, rest_a = _split_code(_normalise(earlier))
    code_b, rest_b = _split_code(_normalise(later))
    if code_a != code_b:
        return "code"
    tokens_a, tokens_b = _tokens(rest_a), _tokens(rest_b)
    lower_a, lower_b = [t.lower() for t in tokens_a], [t.lower() for t in tokens_b]
    neg_a, neg_b = _negations(lower_a), _negations(lower_b)
    if (neg_a > 0) != (neg_b > 0) or neg_a % 2 != neg_b % 2:
        return "negation"
    if _numbers(tokens_a) != _numbers(tokens_b):
        return "number"
    if _units(tokens_a) != _units(tokens_b):
        return "unit"
    cmp_a, cmp_b = _comparisons(tokens_a), _comparisons(tokens_b)
    for group in cmp_a.keys() & cmp_b.keys():
        if cmp_a[group] != cmp_b[group]:
            return "comparison"
    if _entity_missing(_entities(rest_a), _words_lower(rest_b)) or _entity_missing(
        _entities(rest_b), _words_lower(rest_a)
    ):
        return "entity"
    if _slot_changed(_slot_words(rest_a), _slot_words(rest_b)):
        return "slot"
    return None


__all__ = ["GUARDS", "refusal"]
