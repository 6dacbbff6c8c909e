"""Traffic shaping: how fast, over how many connections and how, mail goes to each provider,
destination and egress source; and the automatic reactions to a provider's "slow down".

A shaping file is TOML with three kinds of tables (pydantic checks every key and value, so
``tachymail config check`` names each mistake with its file and table):

- ``[[provider]]`` ``name``, ``domains``, ``mx_suffixes``: a mailbox provider known by its
  recipient domains or by its MX host names (``.google.com`` is every Google MX, whatever
  the recipient domain: a company domain hosted at Google is Gmail for shaping).
- ``[[rule]]``: matched by ``domain`` (recipient domains), ``mx_suffix`` (MX host name
  suffixes) or ``provider`` (a provider's name), or by none of them (every destination), and
  optionally only for one egress ``source``; each sets any of ``connection_limit``,
  ``messages_per_connection``, ``recipients_per_transaction``, ``rate`` ("N/s", "N/min",
  "N/h") with ``burst``, ``idle_timeout``, ``tls`` and ``retry_schedule``; ``cluster =
  true`` makes its rate and connection limit hold across every node (tachymail.cluster).
- ``[[reaction]]``: a reply (``code``, ``enhanced`` prefix, ``text`` regex, all given must
  match) that suspends the destination or the source, or throttles the rule's rate by
  ``rate_factor``, for ``duration``; lifted by itself when the time is up.

The built-in set (``shaping.toml`` beside this module, ``[shaping] builtin``) comes first,
then each of ``[shaping] files`` in order. For one destination the matching rules apply from
the least to the most specific (no matcher, provider, MX suffix, domain; a rule for the
source after the same rule without one; a later file after an earlier one), each setting
only what it names over the ``[pool]`` defaults. Limits are budgets shared by everything the
rule matches: a rule on ``mx_suffix = ".google.com"`` with ``rate = "10/s"`` gives all of
Google's destinations ten messages a second together, per egress source (providers count
per IP).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tachymail.config import Config, PoolConfig, parse_rate
from tachymail.queue.suspensions import SuspensionError, normalize_destination, parse_until

log = logging.getLogger(__name__)

#: the built-in rules, shipped as package data
BUILTIN = "shaping.toml"
_NAME = r"^[A-Za-z0-9._-]{1,64}$"
_SPECIFICITY = {"": 0, "provider": 1, "mx_suffix": 2, "domain": 3}
ACTIONS = ("suspend_destination", "suspend_source", "throttle")


class ShapingError(ValueError):
    """Shaping files that cannot be used; ``problems`` names each mistake."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _names(value: str | list[str]) -> list[str]:
    items = [value] if isinstance(value, str) else value
    return [item.strip().lower().rstrip(".") for item in items]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProviderModel(_Model):
    name: Annotated[str, Field(pattern=_NAME)]
    domains: list[str] = []
    mx_suffixes: list[str] = []

    @field_validator("domains", "mx_suffixes", mode="after")
    @classmethod
    def _lower(cls, value: list[str]) -> list[str]:
        return _names(value)

    @field_validator("mx_suffixes", mode="after")
    @classmethod
    def _dotted(cls, value: list[str]) -> list[str]:
        return [v if v.startswith(".") else "." + v for v in value]


class RuleModel(_Model):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{0,64}$")] = ""
    domain: str | list[str] | None = None
    mx_suffix: str | list[str] | None = None
    provider: Annotated[str, Field(pattern=_NAME)] | None = None
    source: Annotated[str, Field(pattern=_NAME)] | None = None
    connection_limit: Annotated[int, Field(ge=1, le=10_000)] | None = None
    messages_per_connection: Annotated[int, Field(ge=1)] | None = None
    recipients_per_transaction: Annotated[int, Field(ge=1, le=100_000)] | None = None
    rate: str | None = None
    burst: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    idle_timeout: Annotated[float, Field(gt=0, le=86_400)] | None = None
    tls: Literal["none", "opportunistic", "required"] | None = None
    retry_schedule: list[Annotated[int, Field(ge=1)]] | None = None
    cluster: bool = False

    @field_validator("rate")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate(value)  # ValueError names the mistake
        return value

    @field_validator("retry_schedule")
    @classmethod
    def _schedule(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and not value:
            raise ValueError("a non-empty list of seconds")
        return value

    def matcher(self) -> tuple[str, list[str]]:
        """("domain" | "mx_suffix" | "provider" | "", its values)."""
        given = [
            (kind, value)
            for kind, value in (
                ("domain", self.domain),
                ("mx_suffix", self.mx_suffix),
                ("provider", self.provider),
            )
            if value is not None
        ]
        if len(given) > 1:
            raise ValueError("give one of domain, mx_suffix and provider, not several")
        if not given:
            return "", []
        kind, value = given[0]
        values = _names(value)
        if kind == "mx_suffix":
            values = [v if v.startswith(".") else "." + v for v in values]
        return kind, values


class ReactionModel(_Model):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{0,64}$")] = ""
    code: Annotated[int, Field(ge=400, le=599)] | None = None
    enhanced: Annotated[str, Field(pattern=r"^[245](\.\d{1,3}){0,2}$")] | None = None
    text: str | None = None
    provider: Annotated[str, Field(pattern=_NAME)] | None = None
    action: Literal["suspend_destination", "suspend_source", "throttle"]
    duration: str | float
    rate_factor: Annotated[float, Field(gt=0, lt=1)] | None = None

    @field_validator("text")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"bad regular expression: {exc}") from None
        return value

    @field_validator("duration")
    @classmethod
    def _duration(cls, value: str | float) -> str | float:
        seconds = _seconds(value)
        if not 0 < seconds <= 7 * 86400:
            raise ValueError("between 1 second and 7 days")
        return value


def _seconds(value: str | float) -> float:
    if isinstance(value, int | float):
        return float(value)
    try:
        return parse_until(value, now=0.0)
    except SuspensionError:
        raise ValueError(f'{value!r}: a duration such as "90s", "30m", "2h", "1d"') from None


# --- the compiled rules -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``[[rule]]``, with where it came from."""

    name: str
    kind: str  # "domain" | "mx_suffix" | "provider" | ""
    values: tuple[str, ...]
    source: str
    settings: RuleModel
    order: int

    @property
    def specificity(self) -> tuple[int, int, int]:
        return (_SPECIFICITY[self.kind], 1 if self.source else 0, self.order)


@dataclass(frozen=True, slots=True)
class Reaction:
    name: str
    code: int | None
    enhanced: str
    text: re.Pattern[str] | None
    provider: str
    action: str
    seconds: float
    rate_factor: float

    def matches(self, code: int, status: str, text: str, provider: str) -> bool:
        if self.provider and self.provider != provider:
            return False
        if self.code is not None and code != self.code:
            return False
        if self.enhanced and not (
            status == self.enhanced or status.startswith(self.enhanced + ".")
        ):
            return False
        return self.text is None or self.text.search(text) is not None


@dataclass(frozen=True, slots=True)
class Budget:
    """A limit shared by everything one rule matches, per egress source: its key names the
    rule (and the source), so pools of several destinations find the same limiter."""

    key: str
    rule: str
    shared: bool


@dataclass(frozen=True, slots=True)
class Shape:
    """What applies to mail for one destination from one source."""

    #: identifies the rules that made it (pools of one hop with different shapes differ)
    key: str
    limits: PoolConfig
    provider: str = ""
    #: messages per second and burst, and the budget they are counted in (None: no rate)
    rate: float = 0.0
    burst: int = 1
    rate_budget: Budget | None = None
    #: the connection limit across pools (None: only the pool's own max_connections)
    connection_limit: int = 0
    connection_budget: Budget | None = None
    tls: str = ""
    retry_schedule: tuple[int, ...] = ()
    #: where a suspension by a reaction applies: the rule's domains or *.suffix patterns,
    #: or the recipient domain when no rule with a matcher applies
    suspend_targets: tuple[str, ...] = ()


@dataclass(slots=True)
class Shaping:
    """The rules in force (see the module doc). :meth:`shape` is cached per destination."""

    providers: list[ProviderModel] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    reactions: list[Reaction] = field(default_factory=list)
    files: tuple[str, ...] = ()
    _cache: dict[tuple[str, str, str], Shape] = field(default_factory=dict)

    def provider_of(self, domain: str, hosts: Iterable[str]) -> str:
        """The provider whose domains hold *domain* or whose MX suffixes end a host."""
        hosts = [h.lower().rstrip(".") for h in hosts]
        for provider in self.providers:
            if domain in provider.domains:
                return provider.name
            for host in hosts:
                if any(host.endswith(suffix) for suffix in provider.mx_suffixes):
                    return provider.name
        return ""

    def shape(
        self,
        domain: str,
        hop: str,
        hosts: tuple[str, ...],
        source: str,
        defaults: PoolConfig,
    ) -> Shape:
        """The shape of mail to *domain* through next hop *hop* (its *hosts*) from
        *source*, over *defaults* (the hop's [pool] limits); cached per all three."""
        cache_key = (domain, hop, source)
        found = self._cache.get(cache_key)
        if found is not None:
            return found
        if len(self._cache) > 100_000:
            self._cache.clear()  # bounded: a relay to many domains recomputes now and then
        shape = self._compute(domain, hosts, source, defaults)
        self._cache[cache_key] = shape
        return shape

    def _compute(
        self, domain: str, hosts: tuple[str, ...], source: str, defaults: PoolConfig
    ) -> Shape:
        domain = domain.lower()
        lowered = [h.lower().rstrip(".") for h in hosts]
        provider = self.provider_of(domain, lowered)
        matched: list[Rule] = []
        for rule in self.rules:
            if rule.source and rule.source != source:
                continue
            if (
                rule.kind == ""
                or (rule.kind == "domain" and domain in rule.values)
                or (rule.kind == "provider" and provider in rule.values)
                or (
                    rule.kind == "mx_suffix"
                    and any(h.endswith(s) for h in lowered for s in rule.values)
                )
            ):
                matched.append(rule)
        matched.sort(key=lambda r: r.specificity)
        limits = dataclasses.replace(defaults)
        rate = 0.0
        burst = 1
        rate_rule: Rule | None = None
        connection_limit = 0
        connection_rule: Rule | None = None
        tls = ""
        schedule: tuple[int, ...] = ()
        for rule in matched:
            s = rule.settings
            if s.connection_limit is not None:
                connection_limit, connection_rule = s.connection_limit, rule
            if s.messages_per_connection is not None:
                limits.max_messages_per_connection = s.messages_per_connection
            if s.recipients_per_transaction is not None:
                limits.max_recipients = s.recipients_per_transaction
            if s.rate is not None:
                rate, rate_rule = parse_rate(s.rate), rule
                burst = s.burst or 1
            elif s.burst is not None and rate_rule is not None:
                burst = s.burst
            if s.idle_timeout is not None:
                limits.idle_timeout = s.idle_timeout
            if s.tls is not None:
                tls = s.tls
            if s.retry_schedule is not None:
                schedule = tuple(s.retry_schedule)
        if connection_limit:
            limits.max_connections = min(limits.max_connections, connection_limit)
            limits.initial_connections = min(limits.initial_connections, connection_limit)
        if rate:
            limits.rate = 0.0  # the rule's budget replaces the pool's own bucket
        specific = [r for r in matched if r.kind]
        targets = _targets(specific[-1], self.providers) if specific else (domain,)
        return Shape(
            key="+".join(r.name for r in matched),
            limits=limits,
            provider=provider,
            rate=rate,
            burst=burst,
            rate_budget=_budget(rate_rule, source, domain) if rate_rule else None,
            connection_limit=connection_limit,
            connection_budget=(
                _budget(connection_rule, source, domain) if connection_rule else None
            ),
            tls=tls,
            retry_schedule=schedule,
            suspend_targets=targets,
        )

    def describe(self) -> dict[str, Any]:
        """The rules in force as plain JSON data (the admin API's ``GET /api/v1/shaping``)."""
        return {
            "files": list(self.files),
            "providers": [p.model_dump() for p in self.providers],
            "rules": [
                {
                    "name": r.name,
                    "match": r.kind or "all",
                    "values": list(r.values),
                    **r.settings.model_dump(
                        exclude_none=True, exclude={"name", "domain", "mx_suffix", "provider"}
                    ),
                }
                for r in self.rules
            ],
            "reactions": [
                {
                    "name": r.name,
                    "code": r.code,
                    "enhanced": r.enhanced,
                    "text": r.text.pattern if r.text else "",
                    "provider": r.provider,
                    "action": r.action,
                    "seconds": r.seconds,
                    "rate_factor": r.rate_factor,
                }
                for r in self.reactions
            ],
        }

    def reaction(self, code: int, status: str, text: str, provider: str) -> Reaction | None:
        """The first reaction that matches a reply, or None."""
        for reaction in self.reactions:
            if reaction.matches(code, status, text, provider):
                return reaction
        return None


def _budget(rule: Rule, source: str, domain: str) -> Budget:
    # A rule without a matcher limits each destination on its own (a default per domain);
    # one with a matcher is one budget for all it matches.
    scope = rule.name if rule.kind else f"{rule.name}@{domain}"
    return Budget(f"{scope}|{source or 'default'}", rule.name, rule.settings.cluster)


def _targets(rule: Rule, providers: list[ProviderModel]) -> tuple[str, ...]:
    if rule.kind == "domain":
        return rule.values
    if rule.kind == "mx_suffix":
        return tuple("*" + v for v in rule.values)
    out: list[str] = []
    for provider in providers:
        if provider.name in rule.values:
            out += provider.domains
            out += ["*" + suffix for suffix in provider.mx_suffixes]
    return tuple(out)


# --- loading -------------------------------------------------------------------------------


def _read(text: str, origin: str, problems: list[str]) -> dict[str, list[tuple[int, Any]]] | None:
    """The tables of one file that are valid; a problem per mistake in the others (each
    table is checked on its own, so the cross-checks of :func:`load` still see the rest)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"{origin}: not valid TOML: {exc}")
        return None
    models: dict[str, type[_Model]] = {
        "provider": ProviderModel,
        "rule": RuleModel,
        "reaction": ReactionModel,
    }
    valid: dict[str, list[tuple[int, Any]]] = {"provider": [], "rule": [], "reaction": []}
    for key, tables in data.items():
        model = models.get(key)
        if model is None:
            problems.append(
                f"{origin}: {key}: unknown table (known: [[provider]], [[rule]], [[reaction]])"
            )
            continue
        if not isinstance(tables, list):
            problems.append(f"{origin}: {key}: must be an array of tables ([[{key}]])")
            continue
        for i, table in enumerate(tables):
            label = f"{key}[{i}]"
            if isinstance(table, dict) and (table.get("name") or table.get("domain")):
                label += f" ({table.get('name') or table.get('domain')})"
            try:
                valid[key].append((i, model.model_validate(table)))
            except ValidationError as exc:
                for error in exc.errors():
                    where = ".".join(str(p) for p in error["loc"] if not _is_type_tag(p))
                    problems.append(f"{origin}: {label}.{where}: {_problem(error)}")
    return valid


def _is_type_tag(part: int | str) -> bool:
    """pydantic names the member of a union it tried ("str", "float") in the location."""
    return isinstance(part, int) or part in (
        "str",
        "float",
        "int",
        "list[str]",
        "function-after[_duration(), union[str,float]]",
    )


def _problem(error: Any) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{message} (got {error['input']!r})" if error["type"] != "missing" else message


def load(config: Config) -> Shaping:
    """The shaping of *config*: the built-in set (unless ``[shaping] builtin = false``), then
    each file of ``[shaping] files``. Raises ShapingError naming every mistake, including
    a rule or reaction naming an unknown provider or source."""
    problems: list[str] = []
    parsed: list[tuple[str, dict[str, list[tuple[int, Any]]]]] = []
    if config.shaping.builtin:
        text = resources.files("tachymail.delivery").joinpath(BUILTIN).read_text()
        found = _read(text, f"built-in {BUILTIN}", problems)
        if found is not None:
            parsed.append((f"built-in {BUILTIN}", found))
    for name in config.shaping.files:
        try:
            text = Path(name).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{name}: cannot read: {exc}")
            continue
        found = _read(text, name, problems)
        if found is not None:
            parsed.append((name, found))
    shaping = Shaping(files=tuple(config.shaping.files))
    providers: dict[str, ProviderModel] = {}
    for _, file in parsed:
        for _, provider in file["provider"]:
            providers[provider.name] = provider  # a later file redefines a provider
    shaping.providers = list(providers.values())
    sources = {s.name for s in config.egress_sources}
    order = 0
    own_reactions: list[Reaction] = []
    builtin_reactions: list[Reaction] = []
    for origin, file in parsed:
        for i, model in file["rule"]:
            order += 1
            rule = _rule(model, f"{origin}: rule[{i}]", order, providers, sources, problems)
            if rule is not None:
                shaping.rules.append(rule)
        for i, reaction_model in file["reaction"]:
            where = f"{origin}: reaction[{i}]"
            reaction = _reaction(reaction_model, where, providers, problems)
            (builtin_reactions if origin.startswith("built-in") else own_reactions).append(reaction)
    # The operator's reactions first: an operator file overrides a built-in reaction by
    # matching first, as bounce rules do.
    shaping.reactions = own_reactions + builtin_reactions
    if problems:
        raise ShapingError(problems)
    return shaping


def _rule(
    model: RuleModel,
    where: str,
    order: int,
    providers: dict[str, ProviderModel],
    sources: set[str],
    problems: list[str],
) -> Rule | None:
    try:
        kind, values = model.matcher()
    except ValueError as exc:
        problems.append(f"{where}: {exc}")
        return None
    if kind == "provider" and values[0] not in providers:
        problems.append(f"{where}.provider: {values[0]!r} is not a [[provider]]")
    if model.source and model.source not in sources:
        known = ", ".join(sorted(sources)) or "none configured"
        problems.append(f"{where}.source: {model.source!r} is not an egress_source ({known})")
    if kind == "domain":
        for value in values:
            try:
                normalize_destination(value)
            except SuspensionError:
                problems.append(f"{where}.domain: {value!r} is not a domain")
    if model.burst is not None and model.rate is None:
        problems.append(f"{where}.burst: needs a rate")
    name = model.name or f"{kind or 'all'}:{','.join(values) or '*'}"
    if model.source and not model.name:
        name += f"/{model.source}"
    return Rule(name, kind, tuple(values), model.source or "", model, order)


def _reaction(
    model: ReactionModel, where: str, providers: dict[str, ProviderModel], problems: list[str]
) -> Reaction:
    if model.code is None and model.enhanced is None and model.text is None:
        problems.append(f"{where}: give at least one of code, enhanced and text")
    if model.provider and model.provider not in providers:
        problems.append(f"{where}.provider: {model.provider!r} is not a [[provider]]")
    if model.action == "throttle" and model.rate_factor is None:
        problems.append(f"{where}.rate_factor: a throttle needs one (0 < factor < 1)")
    if model.action != "throttle" and model.rate_factor is not None:
        problems.append(f'{where}.rate_factor: only for action = "throttle"')
    return Reaction(
        name=model.name or where.replace(": ", ":"),
        code=model.code,
        enhanced=model.enhanced or "",
        text=re.compile(model.text, re.IGNORECASE) if model.text else None,
        provider=model.provider or "",
        action=model.action,
        seconds=_seconds(model.duration),
        rate_factor=model.rate_factor or 1.0,
    )


def problems(config: Config) -> list[str]:
    """Every mistake in *config*'s shaping files (empty: they load)."""
    try:
        load(config)
    except ShapingError as exc:
        return [f"shaping: {p}" for p in exc.problems]
    return []


#: the rules the supervisor checked and installed before forking its workers (a worker
#: restarted later keeps using them, even if a file changed on disk since)
_installed: Shaping | None = None


def install(shaping: Shaping) -> None:
    global _installed
    _installed = shaping


def current(config: Config) -> Shaping:
    """The installed rules, or those of *config* read now (a process started without a
    supervisor: tests, the CLI); the built-in set alone if those are broken."""
    if _installed is not None:
        return _installed
    try:
        return load(config)
    except ShapingError as exc:
        log.error("shaping: %s; using the built-in rules only", exc)
        return load(
            dataclasses.replace(config, shaping=dataclasses.replace(config.shaping, files=[]))
        )
