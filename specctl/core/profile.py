"""The one profile loader: TOML files, `extends`, `--set` overrides, validation with helpful errors.

The loader knows no kind of model: callers pass `schemas`, the profile class of each `kind` (specctl/backends.py
holds the table of both halves), and the merged TOML is validated against the class its `kind` names."""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from specctl.core.errors import SpecctlError
from specctl.core.schema import Profile

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROFILE_DIR_ENV = "SPECCTL_PROFILES"
DEFAULT_KIND = "timeseries"
P = TypeVar("P", bound=Profile)
Schemas = Mapping[str, type[Profile]]  # kind -> profile class


def profiles_dir() -> Path:
    """Where shipped profiles live: $SPECCTL_PROFILES, else the repository's `profiles/` folder."""
    env = os.environ.get(PROFILE_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "profiles"


def shipped_profiles() -> list[str]:
    root = profiles_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.toml"))


def find_profile(ref: str, relative_to: Path | None = None) -> Path:
    """A path to a TOML file, or the name of a shipped profile (`quickstart/target`)."""
    if Path(ref).is_dir() and not (Path(ref) / "default.toml").is_file():
        raise SpecctlError(f"profile '{ref}' is a directory: give a .toml file inside it (or a shipped name)")
    candidates = [Path(ref)]
    if relative_to is not None:
        candidates.insert(0, relative_to / ref)
    candidates.append(profiles_dir() / ref)
    for c in list(candidates):
        candidates.append(c.with_name(c.name + ".toml"))
        candidates.append(c / "default.toml")
    for c in candidates:
        if c.is_file():
            return c
    close = difflib.get_close_matches(ref, shipped_profiles(), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "; `specctl profiles list` shows the shipped ones"
    raise SpecctlError(f"profile not found: '{ref}' (no such file, and not a shipped profile){hint}")


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise SpecctlError(f"{path}: TOML syntax error: {e}") from None
    except OSError as e:
        raise SpecctlError(f"{path}: cannot read profile: {e.strerror}") from None


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_raw(path: Path, _seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], list[Path]]:
    """The merged TOML dict of a profile and what it `extends` (one profile or a list: later parents override earlier
    ones, the file overrides them all), and the files it came from, each once (child last)."""
    path = path.resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise SpecctlError(f"{path}: `extends` forms a cycle: {chain}")
    raw = read_toml(path)
    parents = raw.pop("extends", [])
    parents = [parents] if isinstance(parents, str) else parents
    if not isinstance(parents, list) or not all(isinstance(parent, str) for parent in parents):
        raise SpecctlError(f"{path}: key 'extends': expected a profile name or path, or a list of them")
    merged: dict[str, Any] = {}
    files: list[Path] = []
    for parent in parents:
        base, more = load_raw(find_profile(parent, relative_to=path.parent), (*_seen, path))
        merged, files = deep_merge(merged, base), [*files, *(f for f in more if f not in files)]
    return deep_merge(merged, raw), [*files, path]


def parse_override(item: str) -> tuple[list[str], Any]:
    """`spec.sigma=0.5` -> (["spec", "sigma"], 0.5). Values are TOML literals; bare words are strings, except
    `null`, which unsets an optional key (TOML has no null): `train.save_to=null` exports nothing."""
    if "=" not in item:
        raise SpecctlError(f"--set '{item}': expected key.sub=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", key):
        raise SpecctlError(f"--set '{item}': '{key}' is not a dotted key")
    if text.strip() == "null":
        return key.split("."), None
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return key.split("."), value


def set_dotted(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    node = raw
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise SpecctlError(f"cannot set '{'.'.join(keys)}': '{k}' is not a table")
        node = child
    node[keys[-1]] = value


def _model_at(loc: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    """The pydantic model class that owns the key at `loc` (for suggesting valid keys)."""
    model: type[BaseModel] = root
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """Best-effort line number of key `loc` in a TOML file (tables `[a.b]`, plain and dotted keys)."""
    table: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        header = re.fullmatch(r"\[\s*([^\[\]]+?)\s*\]", stripped)
        if header:
            table = tuple(p.strip().strip('"') for p in header.group(1).split("."))
            continue
        match = re.match(r'\s*("[^"]+"|[\w.-]+)\s*=', line)
        if match:
            key = tuple(p.strip('"') for p in match.group(1).split("."))
            if (*table, *key) == tuple(str(p) for p in loc):
                return number
    return None


def explain(error: ValidationError, files: list[Path], overrides: list[str], root: type[BaseModel],
            label: str = "--set") -> str:
    """One line naming the file, line and key of the first problem (`label` when an override set it), and the
    closest valid key."""
    first = error.errors()[0]
    loc = tuple(first["loc"])
    dotted = ".".join(str(p) for p in loc)
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    where = label if any(k == dotted or k.startswith(dotted + ".") for k in keys) else None
    if where is None:
        for path in reversed(files):
            line = _line_of(path.read_text(encoding="utf-8"), loc)
            if line is not None:
                where = f"{path}:{line}"
                break
        else:
            where = str(files[-1]) if files else "profile"
    if first["type"] == "extra_forbidden":
        owner = _model_at(loc, root)
        valid = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"; did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""
        return f"{where}: unknown key '{dotted}'{hint}"
    got = first.get("input")
    got_text = f", got {got!r}" if not isinstance(got, (dict, list)) else ""
    return f"{where}: key '{dotted}': {first['msg']}{got_text}"


def schema_for(raw: dict[str, Any], schemas: Schemas, files: list[Path], overrides: list[str]) -> type[Profile]:
    """The profile class the merged TOML's `kind` names; a one-line error listing the kinds otherwise."""
    kind = raw.get("kind", DEFAULT_KIND)
    if isinstance(kind, str) and kind in schemas:
        return schemas[kind]
    where = "--set" if any(o.split("=", 1)[0].strip() == "kind" for o in overrides) else (
        str(files[-1]) if files else "profile")
    raise SpecctlError(f"{where}: key 'kind': unknown kind {kind!r} (known: {', '.join(schemas)})")


def load_profile(ref: str, overrides: list[str] | None, schemas: Schemas, relative_to: Path | None = None) -> Profile:
    """Load, merge `extends`, apply `--set` overrides and validate against the class of the profile's kind; `ref`
    is looked up in `relative_to` first (a profile naming another). Raises SpecctlError with one clear line."""
    overrides = list(overrides or [])
    files: list[Path] = []
    raw: dict[str, Any] = {}
    if ref:
        raw, files = load_raw(find_profile(ref, relative_to))
    for item in overrides:
        set_dotted(raw, *parse_override(item))
    schema = schema_for(raw, schemas, files, overrides)
    try:
        profile = schema.model_validate(raw)
    except ValidationError as e:
        raise SpecctlError(explain(e, files, overrides, schema)) from None
    return profile.loaded_from(files[-1] if files else None, tuple(overrides))


def with_overrides(profile: P, overrides: dict[str, Any], where: str = "--set") -> P:
    """A copy of `profile` with dotted-key overrides applied and re-validated (used by sweeps); errors name the
    overrides' origin `where` ([sweep], --grid)."""
    raw = profile.model_dump()
    for key, value in overrides.items():
        set_dotted(raw, key.split("."), value)
    schema = type(profile)
    try:
        copy = schema.model_validate(raw)
    except ValidationError as e:
        raise SpecctlError(explain(e, [], list(overrides), schema, where)) from None
    return copy.loaded_from(profile.source, profile.overrides)
