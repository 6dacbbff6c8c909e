"""Bounce classification: what a remote reply (or our own failure) means, as a class name.

A rule names a class and up to three regular expressions, all of which must match:

- ``code``: the three-digit reply code, matched whole (``"5\\d\\d"``, ``"421"``);
- ``enhanced``: the RFC 3463 enhanced status code, matched whole (``"5\\.1\\.[0-36]"``);
  "" when the reply had none;
- ``text``: searched anywhere in the reply text, case-insensitive (Python ``re``). The
  text is lower-cased first; a pattern written in lower case runs fastest (one with
  capitals is compiled case-insensitive instead).

Rules are tried in order and the first that matches gives the class: the operator's rules
(``[bounce] rules_file``) first, then the built-in ones (``bounce_rules.toml`` beside this
module), so an operator rule overrides a built-in one by matching first.

A reply no rule matches is class ``""`` (metrics and DSNs say "unknown").

The rules are compiled once, each pattern on its own, into an ordered table. A prefilter,
cached per (code, enhanced code) pair, keeps only the rules whose code and enhanced code
match; their text patterns are then searched in order in the lower-cased reply, and the
first hit gives the class. (One combined regular expression with a named group per rule
was measured slower: it defeats the regex engine's literal-prefix scan, where separate
searches keep it; the table classifies a provider's reply in a few microseconds to a few
tens of them.)
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tachymail.config import Config

#: the built-in rules, shipped as package data
BUILTIN_RULES = "bounce_rules.toml"
#: the classes the built-in rules use (operator rules may add others)
CLASSES = (
    "invalid_recipient",
    "inactive_mailbox",
    "mailbox_full",
    "policy",
    "spam_block",
    "reputation",
    "rate_limit",
    "dns_failure",
    "routing",
    "relay_denied",
    "tls_required",
    "auth_required",
    "message_too_large",
    "transient",
)
#: what a class name may look like
CLASS_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
_FIELDS = ("code", "enhanced", "text")


class RulesError(ValueError):
    """A rules file that cannot be used; ``problems`` names each bad rule and why."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: the class it gives and its patterns ("" = any)."""

    cls: str
    code: str = ""
    enhanced: str = ""
    text: str = ""
    #: where it was read ("FILE rule N"), for error messages
    origin: str = ""


def parse_rules(data: dict[str, Any], origin: str) -> list[Rule]:
    """The rules of a parsed rules file (``[[rule]]`` tables with ``class`` and any of
    ``code``, ``enhanced``, ``text``); raises RulesError naming every bad one (unknown
    key, bad class name, no pattern, a regular expression that does not compile)."""
    problems: list[str] = []
    rules: list[Rule] = []
    unknown = set(data) - {"rule"}
    if unknown:
        problems.append(f"{origin}: unknown key(s) {', '.join(sorted(unknown))} (only [[rule]])")
    tables = data.get("rule", [])
    if not isinstance(tables, list):
        raise RulesError([f"{origin}: rule must be an array of tables ([[rule]])"])
    for number, table in enumerate(tables, 1):
        where = f"{origin} rule {number}"
        if not isinstance(table, dict):
            problems.append(f"{where}: must be a table")
            continue
        extra = set(table) - {"class", *_FIELDS}
        if extra:
            problems.append(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
            continue
        cls = table.get("class")
        if not isinstance(cls, str) or not CLASS_NAME.fullmatch(cls):
            problems.append(f"{where}: class must be a name like invalid_recipient, got {cls!r}")
            continue
        patterns: dict[str, str] = {}
        for name in _FIELDS:
            value = table.get(name, "")
            if not isinstance(value, str):
                problems.append(f"{where}: {name} must be a string")
                continue
            if value:
                problem = _pattern_problem(value)
                if problem:
                    problems.append(f"{where}: {name}: bad regular expression {value!r}: {problem}")
                    continue
            patterns[name] = value
        if len(patterns) < len(_FIELDS):
            continue
        if not any(patterns.values()):
            problems.append(f"{where}: needs at least one of code, enhanced, text")
            continue
        rules.append(Rule(cls, origin=where, **patterns))
    if problems:
        raise RulesError(problems)
    return rules


def _pattern_problem(pattern: str) -> str:
    """Why *pattern* is not a usable regular expression, or ""."""
    try:
        re.compile(pattern)
    except re.error as exc:
        return str(exc)
    return ""


def read_rules(path: Path) -> list[Rule]:
    """The rules of the TOML file *path*; raises RulesError (unreadable file, bad TOML,
    bad rule)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RulesError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RulesError([f"{path}: not TOML: {exc}"]) from None
    return parse_rules(data, str(path))


def builtin_rules() -> list[Rule]:
    """The rules shipped with Tachymail."""
    text = resources.files("tachymail.delivery").joinpath(BUILTIN_RULES).read_text("utf-8")
    return parse_rules(tomllib.loads(text), BUILTIN_RULES)


class BounceClassifier:
    """Classifies replies by *rules*, tried in order (see the module doc). Immutable apart
    from its caches; cheap to share within a process."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = tuple(rules)
        self._codes = [_fullmatcher(rule.code) for rule in self.rules]
        self._enhanced = [_fullmatcher(rule.enhanced) for rule in self.rules]
        self._texts = [_searcher(rule.text) for rule in self.rules]
        #: (code, enhanced) -> the rules whose code and enhanced patterns both match, in
        #: order: the prefilter, filled on first sight of each pair (replies repeat a few
        #: dozen pairs; the size is capped against garbage)
        self._candidates: dict[tuple[int, str], tuple[int, ...]] = {}

    def _prefilter(self, code: int, enhanced: str) -> tuple[int, ...]:
        key = (code, enhanced)
        found = self._candidates.get(key)
        if found is None:
            digits = f"{code:03d}"
            found = tuple(
                number
                for number in range(len(self.rules))
                if self._codes[number](digits) and self._enhanced[number](enhanced)
            )
            if len(self._candidates) < MAX_CACHED:
                self._candidates[key] = found
        return found

    def rule_for(self, code: int, enhanced: str, text: str) -> Rule | None:
        """The first rule that matches the reply, or None."""
        lowered = text.lower()
        for number in self._prefilter(code, enhanced):
            search = self._texts[number]
            if search is None or search(lowered) is not None:
                return self.rules[number]
        return None

    def classify(self, code: int, enhanced: str, text: str) -> str:
        """The class of reply *code* / *enhanced* / *text*; "" when no rule matches.
        *text* may start with the enhanced code, as replies do."""
        rule = self.rule_for(code, enhanced, text)
        return "" if rule is None else rule.cls


#: distinct (code, enhanced) pairs whose candidate rules are remembered
MAX_CACHED = 4096


def _fullmatcher(pattern: str) -> Callable[[str], object]:
    if not pattern:
        return _always  # no pattern: any value
    return re.compile(pattern).fullmatch


def _always(_: str) -> bool:
    return True


def _searcher(pattern: str) -> Callable[[str], re.Match[str] | None] | None:
    """A search over the lower-cased text. A pattern with a capital letter outside an
    escape is compiled case-insensitive (slower); the built-in ones are written in
    lower case so that they need not be."""
    if not pattern:
        return None
    capital = re.search(r"(?<!\\)[A-Z]", pattern) is not None
    return re.compile(pattern, re.IGNORECASE if capital else 0).search


def load_rules(config: Config) -> list[Rule]:
    """The operator's rules (``[bounce] rules_file``, if set) followed by the built-in
    ones; raises RulesError."""
    rules: list[Rule] = []
    rules_file = config.bounce.rules_file
    if rules_file:
        rules += read_rules(Path(rules_file))
    return rules + builtin_rules()


def load_classifier(config: Config) -> BounceClassifier:
    """The classifier of *config* (see :func:`load_rules`); raises RulesError."""
    return BounceClassifier(load_rules(config))


def rules_problems(config: Config) -> list[str]:
    """What is wrong with the rules *config* would load (``config check``), or []."""
    try:
        BounceClassifier(load_rules(config))
    except RulesError as exc:
        return [f"bounce.rules_file: {problem}" for problem in exc.problems]
    except re.error as exc:
        return [f"bounce.rules_file: the rules do not combine: {exc}"]
    return []
