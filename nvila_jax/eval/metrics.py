"""The official answer normalisation, answer extraction and per-sample metrics, as lmms-eval applies them.

Published numbers depend on the harness's exact rules (which side of the comparison gets normalised, how a
letter is pulled out of a free-form answer, the quirks of the original scripts), so every function takes an
optional `task=` naming the benchmark whose rules apply. The rules, per benchmark:

- VQA accuracy (`vqa_accuracy`): the EvalAI answer processor (lower case, ``,``/``?`` removed, ``'s`` split,
  punctuation removed or spaced, periods not followed by a digit removed, number words -> digits, articles
  dropped, contractions restored), then min(#matching other answers / 3, 1) averaged over the leave-one-out
  subsets of the reference answers. TextVQA (the default) normalises every answer fully; VQAv2 only strips
  whitespace from the references and applies the punctuation / digit-article steps to both sides only when
  the references disagree.
- ANLS (`anls`, DocVQA / InfoVQA): 1 - Levenshtein distance / max length over the whitespace-normalised,
  lower-cased strings (the length is taken from the raw strings, as the reference does), best reference,
  0 below 0.5.
- Relaxed accuracy (`relaxed_accuracy`, ChartQA): numbers (``%`` = /100) within 5% of a non-zero target,
  otherwise case-insensitive exact match.
- Multiple-choice letters (`extract_choice`): MMMU's parser (the default), AI2D's "``X.`` prefix or the
  whole answer" filter with case/punctuation-insensitive matching, Video-MME's first A-D after removing answer
  prefixes, and NVILA's EgoSchema parser. Where the reference picks a random letter (nothing parseable), ''
  is returned and the sample counts as wrong.
- Yes/no (`yes_no`): MME's parser (the default: "yes"/"no", "y"/"n", or yes/no within the first four
  characters) and POPE's exact "yes"/"no".
"""

from __future__ import annotations

import re
import string
from typing import Sequence

from rapidfuzz.distance import Levenshtein

# ---------------------------------------------------------------------------------------------------------
# EvalAI / VQA answer processor

# The official contractions table (keys written without apostrophes map to the usual spelling; the table also
# has a few identity and odd entries, kept as they are). The official table's four capitalised keys ("Im",
# "Ive", "Id've", "I'dve") can never match text that is lower-cased first, so they are left out.
_CONTRACTIONS = dict(
    pair.split("=")
    for pair in """
    aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
    couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
    hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd
    howll=how'll hows=how's isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's
    maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't
    mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at
    'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's
    shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've
    somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll
    somebodys=somebody's someoned=someone'd someoned've=someone'd've someone'dve=someone'd've
    someonell=someone'll someones=someone's somethingd=something'd somethingd've=something'd've
    something'dve=something'd've somethingll=something'll thats=that's thered=there'd thered've=there'd've
    there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've
    theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've
    weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
    whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll
    whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've
    wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll
    y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd
    youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've
    """.split()
)
_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBER_WORDS["none"] = "0"
_ARTICLES = frozenset(("a", "an", "the"))
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
# The official pattern is r"(?!<=\d)(\.)(?!\d)": its "lookbehind" is a typo (a lookahead for the text "<="),
# so it removes every period that is not followed by a digit.
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA = re.compile(r"(?<=\d)(\,)+(?=\d)")
# The official code calls PERIOD_STRIP.sub("", text, re.UNICODE): re.UNICODE (32) lands in `count`.
_PERIOD_COUNT = 32


def _vqa_punctuation(text: str) -> str:
    """EvalAI `process_punctuation`: a mark touching a space (or any text with a digit comma) is deleted,
    otherwise replaced by a space; then periods not followed by a digit go."""
    out = text
    delete_all = _DIGIT_COMMA.search(text) is not None
    for p in _PUNCTUATION:
        if delete_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _vqa_digits_articles(text: str) -> str:
    """EvalAI `process_digit_article`: number words -> digits, articles dropped, contractions restored."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """The full EvalAI answer processor (what TextVQA applies to predictions and references)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(text))


def _leave_one_out_accuracy(prediction: str, references: Sequence[str]) -> float:
    """Mean over i of min(1, #(references other than i equal to the prediction) / 3)."""
    matches = sum(ref == prediction for ref in references)
    per_subset = [min(1.0, (matches - (ref == prediction)) / 3) for ref in references]
    return sum(per_subset) / len(per_subset)


def vqa_accuracy(prediction: str, answers: Sequence[str], task: str | None = None) -> float:
    """VQA accuracy of one prediction against the (usually 10) human answers; see the module docstring."""
    rule = _rule(task, "vqa_accuracy", {"textvqa": "textvqa", "vqav2": "vqav2"}, "textvqa")
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    if rule == "textvqa":
        refs = [normalize_vqa_answer(a) for a in answers]
    else:
        refs = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
        if len(set(refs)) > 1:
            refs = [_vqa_digits_articles(_vqa_punctuation(a)) for a in refs]
            pred = _vqa_digits_articles(_vqa_punctuation(pred))
    return _leave_one_out_accuracy(pred, refs)


# ---------------------------------------------------------------------------------------------------------
# ANLS, relaxed accuracy, exact match

def anls(prediction: str, answers: Sequence[str], task: str | None = None, threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one prediction (DocVQA, InfoVQA)."""
    _rule(task, "anls", {"docvqa": "anls", "infovqa": "anls"}, "anls")
    if not answers:
        raise ValueError("anls needs at least one reference answer")
    pred = " ".join(prediction.strip().lower().split())
    distances = []
    for answer in answers:
        ref = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        distances.append(0.0 if length == 0 else Levenshtein.distance(ref, pred) / length)
    score = 1.0 - min(distances)
    return score if score >= threshold else 0.0


def _chart_number(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answer: str, task: str | None = None, max_relative_change: float = 0.05) -> float:
    """ChartQA relaxed accuracy: 1.0 when a numeric prediction is within 5% of a non-zero numeric target or
    the strings match case-insensitively, else 0.0."""
    _rule(task, "relaxed_accuracy", {"chartqa": "chartqa"}, "chartqa")
    pred_num, target_num = _chart_number(prediction), _chart_number(answer)
    if pred_num is not None and target_num:
        return float(abs(pred_num - target_num) / abs(target_num) <= max_relative_change)
    return float(prediction.lower() == answer.lower())


_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def exact_match(prediction: str, answer: str, ignore_case: bool = True, ignore_punctuation: bool = True) -> float:
    """The harness's `exact_match` (HF evaluate semantics): optional lower-casing and ASCII punctuation removal
    on both sides, then string equality (no whitespace stripping). Used by GQA and AI2D."""
    if ignore_case:
        prediction, answer = prediction.lower(), answer.lower()
    if ignore_punctuation:
        prediction, answer = prediction.translate(_PUNCT_TABLE), answer.translate(_PUNCT_TABLE)
    return float(prediction == answer)


# ---------------------------------------------------------------------------------------------------------
# Multiple choice

def option_letters(options: Sequence[str]) -> list[str]:
    """A, B, C, ... for the given options."""
    if len(options) > 26:
        raise ValueError(f"at most 26 options are supported, got {len(options)}")
    return [chr(ord("A") + i) for i in range(len(options))]


def _parse_mmmu_choice(response: str, letters: Sequence[str], contents: dict[str, str] | None,
                       letter_then_period: bool) -> str:
    """The MMMU response parser (also NVILA's EgoSchema parser, which looks for " X " instead of "X " and has
    no "X." step nor content matching): bracketed letters, then bare letters, then option contents in long
    answers; the last occurrence wins among several candidates."""
    for char in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(char)
    response = f" {response} "
    candidates = [c for c in letters if f"({c})" in response]
    bracketed = bool(candidates)
    by_content = False
    if not candidates:
        candidates = [c for c in letters if (f"{c} " if letter_then_period else f" {c} ") in response]
    if not candidates and letter_then_period:
        candidates = [c for c in letters if f"{c}." in response]
    if not candidates and contents is not None and len(response.split()) > 5:
        candidates = [c for c in letters if contents[c].lower() in response.lower()]
        by_content = True
    if not candidates:
        return ""  # the reference picks a random letter here
    if len(candidates) == 1:
        return candidates[0]
    if by_content:
        positions = [response.lower().rfind(contents[c].lower()) for c in candidates]
    elif bracketed:
        positions = [response.rfind(f"({c})") for c in candidates]
    else:
        positions = [response.rfind(f" {c} ") for c in candidates]
    return candidates[positions.index(max(positions))]


_AI2D_LETTER = re.compile(r"^\s*([A-Z])\.")
_VIDEOMME_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                      # two entries the reference concatenates by a missing comma
                      "The best option isThe correct option is", "Best answer:Best option:")


def extract_choice(response: str, options: Sequence[str], task: str | None = None) -> str:
    """The option letter a free-form response picks ('' when none can be found), by the benchmark's rule."""
    rule = _rule(task, "extract_choice", {"mmmu": "mmmu", "ai2d": "ai2d", "videomme": "videomme",
                                           "egoschema": "egoschema"}, "mmmu")
    letters = option_letters(options)
    if rule == "mmmu":
        return _parse_mmmu_choice(response, letters, dict(zip(letters, options)), letter_then_period=True)
    if rule == "egoschema":
        return _parse_mmmu_choice(response, letters, None, letter_then_period=False)
    if rule == "ai2d":
        m = _AI2D_LETTER.match(response)
        if m:
            return m.group(1) if m.group(1) in letters else ""
        # exact_match(ignore_case, ignore_punctuation) of the whole response against the target letter
        bare = response.lower().translate(_PUNCT_TABLE)
        return bare.upper() if bare.upper() in letters else ""
    # videomme: the first A-D anywhere after dropping answer prefixes; long answers without one give ''
    text = response.strip()
    for prefix in _VIDEOMME_PREFIXES:
        text = text.replace(prefix, "")
    m = re.search(r"[ABCD]", text)
    return m.group(0) if m else ""


# ---------------------------------------------------------------------------------------------------------
# Yes / no

def yes_no(response: str, task: str | None = None) -> str:
    """'yes', 'no' or '' (neither) by the benchmark's rule: MME's lenient parser (default) or POPE's exact."""
    rule = _rule(task, "yes_no", {"mme": "mme", "pope": "pope"}, "mme")
    text = response.lower().strip()
    if rule == "pope":
        return text if text in ("yes", "no") else ""
    text = text.replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "")
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else ""


# ---------------------------------------------------------------------------------------------------------
# MMMU open questions

_NUM_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL = (":", ",", ".", "!", "?", ";", "'")


def _mmmu_normalize(text: str) -> list:
    """A number (commas dropped, rounded to 2 decimals) or the lower-cased string; single characters become
    [" x", "x "] so they only match as words."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [" " + text, text + " "] if len(text) == 1 else [text]


def _mmmu_key_responses(response: str) -> list[str]:
    """The tails after "so / is / therefore / answer ..." of each line (the last line also after "=")."""
    response = response.strip().strip(".").lower()
    # The reference splits on r"\.\s(?=[A-Z])|\n" after lower-casing, so only newlines ever split.
    lines = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for i, line in enumerate(lines):
        indicators = _KEY_INDICATORS + (("=",) if i == len(lines) - 1 else ())
        tails = [line.split(ind)[-1].strip() for ind in indicators if ind in line]
        shortest = None
        for tail in tails:  # first non-empty tail, replaced by strictly shorter ones
            if not shortest or len(tail) < len(shortest):
                shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL:
            keys.append(shortest)
    return keys or [response]


def mmmu_open_correct(response: str, answer: str | Sequence[str]) -> bool:
    """MMMU open-question scoring: parse candidate strings/numbers from the response, then a number must equal
    a normalised answer number, or a normalised answer string must occur inside a candidate string."""
    keys = _mmmu_key_responses(response)
    candidates: list = list(keys)
    for key in keys:
        candidates += _NUM_WITH_COMMAS.findall(key) + _NUM_SCIENTIFIC.findall(key) + _NUM_SIMPLE.findall(key)
    parsed = [p for c in candidates for p in _mmmu_normalize(c)]
    golds = [g for a in ([answer] if isinstance(answer, str) else answer) for g in _mmmu_normalize(a)]
    for pred in parsed:
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in golds):
                return True
        elif pred in golds:
            return True
    return False


# ---------------------------------------------------------------------------------------------------------

def _rule(task: str | None, metric: str, rules: dict[str, str], default: str) -> str:
    """The rule variant for `task` (None -> the default), or a clear error naming the supported tasks."""
    if task is None:
        return default
    key = task.lower()
    for name, rule in rules.items():
        if key == name or key.startswith(name + "_"):
            return rule
    raise ValueError(f"{metric}: no rules for task {task!r}; supported: {', '.join(rules)} (or task=None)")
