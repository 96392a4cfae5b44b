"""The official metrics, checked on cases worked out by hand from each benchmark's definition as the standard
harness (lmms-eval) implements it, including the quirks published numbers depend on."""

from __future__ import annotations

import pytest

from nvila_jax.eval.metrics import (
    anls,
    exact_match,
    extract_choice,
    mmmu_open_correct,
    normalize_vqa_answer,
    relaxed_accuracy,
    vqa_accuracy,
    yes_no,
)


@pytest.mark.parametrize("raw, normalized", [
    ("Two dogs.", "2 dogs"),  # number word -> digit; the final period goes
    ("3.5", "3.5"),  # a period followed by a digit stays
    ("1,000", "1000"),  # commas are removed first
    ("the cat's toy", "cat 's toy"),  # "'s" is split off; articles dropped
    ("it's", "it 's"),  # ... so "it's" never reaches the contraction table
    ("dont", "don't"), ("wont", "won't"), ("isnt", "isn't"),  # contractions restored
    ("Im", "im"),  # the table's capitalised keys never match lower-cased text
    ("hello-world", "hello world"),  # a mark touching no space becomes a space
    ("hello - world", "hello world"),  # a mark next to a space is deleted
    ("(a) cat", "cat"),  # "(" becomes a space, ")" is deleted (")" is followed by a space), "a" dropped
    ("yes!", "yes"),
    ("None", "0"), ("ten", "10"), ("eleven", "eleven"),  # only zero..ten (and none) are mapped
    ("an apple", "apple"),
    ("Mr. Smith", "mr smith"),
    ("red\tcar\n", "red car"),
    ("." * 40, "." * 8),  # the reference passes re.UNICODE (32) as the count: only 32 periods are removed
])
def test_vqa_normalization(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


def test_vqa_accuracy_leave_one_out():
    # "2" matches 3 of 10 normalised answers: the 3 subsets without a match-giver have 2 matches (2/3), the 7
    # others have 3 (capped at 1): (3 * 2/3 + 7) / 10 = 0.9
    assert vqa_accuracy("2", ["two"] * 2 + ["2"] + ["three"] * 7) == pytest.approx(0.9)
    # one matching answer: its own subset scores 0, the 9 others 1/3 each -> 0.3
    assert vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy("5", ["two"] * 10) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("x", [])


def test_vqa_accuracy_textvqa_vs_vqav2_rules():
    # TextVQA normalises the references; VQAv2 leaves identical references raw, so the normalised
    # prediction "man 's" never equals the raw "man's".
    assert vqa_accuracy("man's", ["man's"] * 10, task="textvqa") == 1.0
    assert vqa_accuracy("man's", ["man's"] * 10, task="vqav2") == 0.0
    assert vqa_accuracy("two", ["Two"] * 10, task="vqav2") == 0.0
    assert vqa_accuracy("two", ["Two"] * 10, task="textvqa") == 1.0
    # when the references disagree, VQAv2 normalises them ("two" -> "2"): all 10 match
    assert vqa_accuracy("2", ["two"] * 5 + ["2"] * 5, task="vqav2") == 1.0
    assert vqa_accuracy("2", ["two"] * 5 + ["2"] * 5, task="vqav2_val") == 1.0  # task variants share the rule


def test_anls():
    assert anls("hello", ["hello"]) == 1.0
    assert anls("helo", ["hello"]) == pytest.approx(0.8)  # 1 edit / 5
    assert anls("  Hello   World ", ["hello world"]) == 1.0  # case and whitespace normalised
    # the length is taken from the raw strings: 2 edits / len("abcd   ") = 7, not / 4
    assert anls("ab", ["abcd   "]) == pytest.approx(1 - 2 / 7)
    assert anls("abc", ["abcdef"]) == pytest.approx(0.5)  # exactly at the threshold: kept
    assert anls("ab", ["abcdef"]) == 0.0  # 1 - 4/6 < 0.5
    assert anls("hello", ["xyz", "hello"]) == 1.0  # best reference
    assert anls("", [""]) == 1.0
    assert anls("45", ["45%"], task="infovqa") == pytest.approx(2 / 3)


def test_relaxed_accuracy():
    assert relaxed_accuracy("12", "12.5") == 1.0  # 4% off
    assert relaxed_accuracy("11.8", "12.5") == 0.0  # 5.6% off
    assert relaxed_accuracy("2100", "2014") == 1.0  # years are numbers too: 4.3% off
    assert relaxed_accuracy("50%", "0.5") == 1.0 and relaxed_accuracy("0.5", "50%") == 1.0
    assert relaxed_accuracy("Yes", "yes") == 1.0  # non-numeric: case-insensitive exact match
    assert relaxed_accuracy("0", "0") == 1.0 and relaxed_accuracy("0.0", "0") == 0.0  # target 0: string match
    assert relaxed_accuracy("1,000", "1000") == 0.0  # "1,000" is not a float: string match fails
    assert relaxed_accuracy(" 12", "12") == 1.0  # float() ignores surrounding spaces


def test_exact_match_harness_semantics():
    assert exact_match("No.", "no") == 1.0  # case and ASCII punctuation ignored
    assert exact_match("A woman", "woman") == 0.0
    assert exact_match("no ", "no") == 0.0  # whitespace is not stripped


OPTIONS = ["red fox", "blue whale", "green frog", "grey cat"]


@pytest.mark.parametrize("response, letter", [
    ("A", "A"),
    ("(B) because it is big", "B"),
    ("The answer is C.", "C"),
    ("I think A is wrong, B is right", "B"),  # several letters: the last occurrence wins
    ("The correct option is the blue whale in the ocean", "B"),  # long answer: matched by content
    ("I don't know", ""),  # nothing parseable (the reference picks a random letter)
    ("USA is the answer", "A"),  # "A " inside "USA " counts, as in the reference
])
def test_extract_choice_mmmu(response, letter):
    assert extract_choice(response, OPTIONS, task="mmmu") == letter
    assert extract_choice(response, OPTIONS) == letter  # the default rule


@pytest.mark.parametrize("response, letter", [
    ("B", "B"), ("b", "B"), ("(C)", "C"), ("A. dog", "A"), (" D. ", "D"),
    ("The answer is A", ""),  # only an "X." prefix or the bare letter counts
    ("E", ""),  # not an option
    (" A", ""),  # whitespace is not stripped before the comparison
])
def test_extract_choice_ai2d(response, letter):
    assert extract_choice(response, OPTIONS, task="ai2d") == letter


@pytest.mark.parametrize("response, letter", [
    ("The best answer is: B", "B"), ("A", "A"), ("(C) The man", "C"),
    ("I cannot determine from the video at all honestly speaking", ""),
    ("All the people leave, so C", "A"),  # the first capital A-D anywhere
])
def test_extract_choice_videomme(response, letter):
    assert extract_choice(response, OPTIONS, task="videomme") == letter


def test_extract_choice_egoschema_differs_from_mmmu():
    options = OPTIONS + ["pink pig"]
    assert extract_choice("C.", options, task="egoschema") == "C"
    assert extract_choice("Option E is correct", options, task="egoschema") == "E"
    assert extract_choice("C is the answer because of D", options, task="egoschema") == "D"
    # NVILA's EgoSchema parser needs the letter between spaces; MMMU's accepts "C " anywhere
    assert extract_choice("answer:C", options, task="egoschema") == ""
    assert extract_choice("answer:C", options, task="mmmu") == "C"


@pytest.mark.parametrize("response, mme, pope", [
    ("Yes", "yes", "yes"), ("No.", "no", ""), ("y", "yes", ""), ("N", "no", ""),
    ("Yes, there is", "yes", ""), ("There is no dog", "", ""), ("not really", "no", ""),
    ("none", "no", ""), ("x", "", ""), (" no ", "no", "no"),
])
def test_yes_no(response, mme, pope):
    assert yes_no(response, task="mme") == mme
    assert yes_no(response) == mme  # the default rule
    assert yes_no(response, task="pope") == pope


@pytest.mark.parametrize("response, answer, correct", [
    ("The answer is 42", "42", True),  # the tail after "is " is parsed
    ("1,234 apples", "1234", True),  # numbers with thousands separators
    ("blue", "Blue", True),
    ("a", "a", True), ("banana", "a", False),  # one-letter answers only match as words
    ("3.14159", "3.14", True),  # numbers are compared rounded to 2 decimals
    ("x = 5", "5", True),  # the last line is also split at "="
    ("seven", "7", False),
])
def test_mmmu_open(response, answer, correct):
    assert mmmu_open_correct(response, answer) is correct


def test_unknown_task_names_are_rejected():
    with pytest.raises(ValueError, match="supported: textvqa, vqav2"):
        vqa_accuracy("a", ["a"], task="docvqa")
    with pytest.raises(ValueError, match="extract_choice"):
        extract_choice("A", OPTIONS, task="pope")
