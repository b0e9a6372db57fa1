"""Constitutions (principles) and objectives (principle × aspect), loaded from YAML data files.

A constitution file:

    name: virtues
    description: ...
    principles:
      - name: honesty
        description: one line
        critique: a critique request
        revision: a revision request
        comparison: a comparison question ("Which response is more honest?")
        demonstrations:            # optional: few-shot turns for contrastive contexts
          positive: [{prompt: ..., response: ...}, ...]
          negative: [{prompt: ..., response: ...}, ...]

Aspect follow-up questions live in data/constitutions/aspects.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from morlaif.artifacts import read_text
from morlaif.config import yaml_key_lines
from morlaif.errors import InputError

BUILTIN = ("virtues", "morlaif12", "hhh")
ASPECTS = ("action", "motivation", "consequence")
HOLISTIC = "holistic"
_REQUIRED = ("name", "description", "critique", "revision", "comparison")


@dataclass(frozen=True)
class Principle:
    name: str
    description: str
    critique: str
    revision: str
    comparison: str
    demonstrations: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Objective:
    principle: Principle
    aspect: str = "action"

    @property
    def name(self) -> str:
        return self.principle.name if self.aspect == "action" else f"{self.principle.name}:{self.aspect}"


@dataclass
class Constitution:
    name: str
    description: str
    principles: list[Principle]
    source: str

    def principle(self, name: str) -> Principle:
        for p in self.principles:
            if p.name == name:
                return p
        raise InputError(f"principle '{name}' is not in constitution '{self.name}' ({', '.join(self.names)})",
                         key="constitution.objectives")

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.principles]

    def objectives(self, spec: list[str] | None = None) -> list[Objective]:
        """Parse 'principle' / 'principle:aspect' names; None = every principle on the action aspect."""
        if spec is None:
            return [Objective(p) for p in self.principles]
        if not spec:
            raise InputError("the objective list is empty", key="constitution.objectives")
        out = []
        for s in spec:
            pname, _, aspect = s.partition(":")
            aspect = aspect or "action"
            if aspect not in ASPECTS:
                raise InputError(f"unknown aspect '{aspect}' in '{s}' (one of {', '.join(ASPECTS)})",
                                 key="constitution.objectives")
            out.append(Objective(self.principle(pname), aspect))
        names = [o.name for o in out]
        if len(set(names)) != len(names):
            raise InputError(f"duplicate objective in {names}", key="constitution.objectives")
        return out

    def holistic(self) -> Principle:
        """The single holistic objective used for the single-objective baseline."""
        return Principle(
            name=HOLISTIC,
            description="overall quality under the whole constitution",
            critique="",
            revision="",
            comparison="Which response is better overall: more helpful, honest and harmless, and more in keeping with "
            + ", ".join(self.names) + "?",
        )


def configured_objectives(cc) -> list[Objective]:
    """The objectives a run optimises: the config's `constitution` section (name, objectives) resolved."""
    return load_constitution(cc.name).objectives(cc.objectives)


def _data_text(*parts: str) -> str:
    return resources.files("morlaif").joinpath("data", *parts).read_text()


def load_constitution(name_or_path: str) -> Constitution:
    """A built-in name or a YAML path; errors name the file and the key."""
    if name_or_path in BUILTIN:
        src = f"morlaif/data/constitutions/{name_or_path}.yaml"
        text = _data_text("constitutions", f"{name_or_path}.yaml")
    else:
        p = Path(name_or_path)
        if not p.is_file():
            raise InputError(f"constitution '{name_or_path}' is neither built in ({', '.join(BUILTIN)}) nor a file",
                             key="constitution.name")
        src, text = str(p), read_text(p)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InputError(f"malformed YAML: {getattr(e, 'problem', e)}", file=src, line=mark.line + 1 if mark else None) from None
    if not isinstance(doc, dict):
        raise InputError("a constitution is a mapping with 'name' and 'principles'", file=src, line=1)
    lines = yaml_key_lines(text)
    for k in doc:
        if k not in ("name", "description", "principles"):
            raise InputError("unknown key", file=src, line=lines.get(str(k)), key=str(k))
    plist = doc.get("principles")
    if not isinstance(plist, list) or not plist:
        raise InputError("must be a non-empty list of principles", file=src, line=lines.get("principles"), key="principles")
    principles, seen = [], set()
    for i, p in enumerate(plist):
        key = f"principles[{i}]"
        line = lines.get(key)
        if not isinstance(p, dict):
            raise InputError("each principle is a mapping", file=src, line=line, key=key)
        for k in p:
            if k not in (*_REQUIRED, "demonstrations"):
                raise InputError("unknown key", file=src, line=lines.get(f"{key}.{k}", line), key=f"{key}.{k}")
        for k in _REQUIRED:
            v = p.get(k)
            if not isinstance(v, str) or not v.strip():
                raise InputError("missing or empty (a non-empty string is required)", file=src,
                                 line=lines.get(f"{key}.{k}", line), key=f"{key}.{k}")
        if ":" in p["name"] or p["name"] in seen or p["name"] == HOLISTIC:
            raise InputError(f"principle names must be unique, without ':' and not '{HOLISTIC}'", file=src,
                             line=lines.get(f"{key}.name", line), key=f"{key}.name")
        seen.add(p["name"])
        demos = p.get("demonstrations") or {}
        _check_demos(demos, src, lines.get(f"{key}.demonstrations", line), f"{key}.demonstrations")
        principles.append(Principle(*(p[k].strip() for k in _REQUIRED), demonstrations=demos))
    return Constitution(str(doc.get("name", Path(src).stem)), str(doc.get("description", "")), principles, src)


def _check_demos(demos, src, line, key) -> None:
    if not isinstance(demos, dict):
        raise InputError("demonstrations is a mapping with 'positive' and 'negative' lists", file=src, line=line, key=key)
    for side, turns in demos.items():
        if side not in ("positive", "negative") or not isinstance(turns, list):
            raise InputError("expected 'positive' / 'negative' lists", file=src, line=line, key=f"{key}.{side}")
        for j, t in enumerate(turns):
            if not (isinstance(t, dict) and isinstance(t.get("prompt"), str) and isinstance(t.get("response"), str)):
                raise InputError("each demonstration has string 'prompt' and 'response'", file=src, line=line,
                                 key=f"{key}.{side}[{j}]")


def aspect_questions() -> dict[str, str]:
    """Follow-up question per non-action aspect (data file)."""
    doc = yaml.safe_load(_data_text("constitutions", "aspects.yaml"))
    return {k: v for k, v in doc.items()}


def load_template(name: str) -> str:
    """A prompt template from data/templates/ (e.g. 'critique.txt')."""
    return _data_text("templates", name)
