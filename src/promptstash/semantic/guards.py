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
  faster/slower, better/worse, ascending/descending, longer/shorter, first/last), they must use the same side;
- ``entity``: every named entity (capitalised word that is not a common word, acronym, CamelCase) of one
  message must appear, in any case, as a word of the other.

``refusal(earlier, later)`` is pure and symmetric (``refusal(a, b) == refusal(b, a)``), case- and
punctuation-tolerant where paraphrases differ, and returns the first refusing guard in ``GUARDS`` order.
Text inside code spans is checked only by the ``code`` guard (once the spans match, they are removed before
the other guards look).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

GUARDS: tuple[str, ...] = ("code", "negation", "number", "unit", "comparison", "entity")

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
         "max", "maximum", "maximal", "maximise", "maximize", "above", "exceeds", "exceed", "upper", "uppercase",
         "increase", "increases", "increasing", "increment", "heavier", "taller", "wider", "deeper", ">", ">="),
        ("less", "least", "fewer", "fewest", "smaller", "smallest", "lesser", "lower", "lowest", "min", "minimum",
         "minimal", "minimise", "minimize", "below", "under", "lowercase", "decrease", "decreases", "decreasing",
         "decrement", "lighter", "shorter", "narrower", "shallower", "<", "<="),
    ),
    "time": (
        ("before", "earlier", "earliest", "older", "oldest", "previous", "prior", "first", "past", "since"),
        ("after", "later", "latest", "newer", "newest", "next", "following", "last", "future", "until"),
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
_SENTENCE_END = re.compile(r"[.!?:;\n]\s*$")


def _entities(text: str) -> frozenset[str]:
    """Lower-cased words that look like names: capitalised and not common, acronyms, CamelCase / mixed case."""
    found: set[str] = set()
    for match in _WORD.finditer(text):
        word = match.group(0)
        lower = word.lower()
        inner_caps = sum(1 for c in word[1:] if c.isupper())
        if inner_caps and any(c.islower() for c in word) or sum(c.isupper() for c in word) >= 2:
            found.add(lower)  # acronym (HTTP, USA) or CamelCase / mixed case (PyTorch, iPhone, macOS)
            continue
        if not word[0].isupper() or lower in _COMMON or lower.split("'")[0] in _COMMON:
            continue
        found.add(lower)
    return frozenset(found)


def _words_lower(text: str) -> frozenset[str]:
    words: set[str] = set()
    for match in _WORD.finditer(text):
        w = match.group(0).lower()
        words.add(w)
        words.update(part for part in re.split(r"['-]", w) if part)
    return frozenset(words)


def _entity_missing(entities: Iterable[str], other_words: frozenset[str]) -> bool:
    return any(e not in other_words for e in entities)


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
    return None


__all__ = ["GUARDS", "refusal"]
