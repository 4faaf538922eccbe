"""Typed configuration: dataclass schema → preset YAML → ``key=value`` overrides → one resolved config.

Every command's settings are a dataclass (its field docs are the help text). A preset is a YAML file under
``presets/<kind>/NAME.yaml`` (or any path). A nested section whose value is a *string* names a preset of that
section's own kind: ``rae: dinov2-b`` in a ``train-dit`` preset loads ``presets/rae/dinov2-b.yaml`` into the ``rae``
section, and ``rae=tiny`` works the same way as an override. Unknown keys are errors that list the valid keys.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

from rae_cli.errors import RaeError

T = TypeVar("T")

PRESETS_DIR_NAME = "presets"


class ConfigError(RaeError, ValueError):
    """A config, preset or override that cannot be used; the message says what is valid."""


def doc(text: str, default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with help text (shown by ``--dry-run`` and ``rae keys``)."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": text})
    return dataclasses.field(default=default, metadata={"help": text})


# ----------------------------------------------------------------------------------------------------------------
# Presets on disk


def presets_root() -> Path:
    """The shipped ``presets/`` folder: next to the package in a checkout, or installed as ``rae_cli/presets``."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / PRESETS_DIR_NAME, here / PRESETS_DIR_NAME):
        if cand.is_dir():
            return cand
    raise ConfigError(f"the shipped presets folder was not found next to {here}; reinstall the package")


def preset_path(kind: str, name_or_path: str) -> Path:
    """Resolve ``NAME`` (a shipped preset of ``kind``) or a path to a YAML file."""
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"preset file not found: {p}")
        return p
    cand = presets_root() / kind / f"{name_or_path}.yaml"
    if cand.is_file():
        return cand
    names = ", ".join(list_presets(kind)) or "(none)"
    raise ConfigError(f"unknown {kind} preset {name_or_path!r}; shipped {kind} presets: {names} "
                      "(or give a path to a .yaml file)")


def list_presets(kind: str | None = None) -> list[str]:
    """Names of the shipped presets of ``kind`` (or ``kind/name`` for every kind)."""
    root = presets_root()
    every = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))
    if kind and kind not in every:
        raise ConfigError(f"no preset kind {kind!r}; kinds: {', '.join(every)}")
    kinds = [kind] if kind else every
    out = []
    for k in kinds:
        for f in sorted((root / k).glob("*.yaml")):
            out.append(f.stem if kind else f"{k}/{f.stem}")
    return out


def preset_summary(path: Path) -> str:
    """The first comment line of a preset file: its one-line description."""
    for line in path.read_text().splitlines():
        s = line.strip()
        if s.startswith("#"):
            return s.lstrip("#").strip()
        if s:
            break
    return ""


def read_yaml(path: Path) -> dict:
    from omegaconf import OmegaConf

    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset must be a mapping of keys to values")
    return data


# ----------------------------------------------------------------------------------------------------------------
# Schema introspection


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (also through ``Optional[...]``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def preset_kind(cls: type) -> str | None:
    return getattr(cls, "preset_kind", None)


# ----------------------------------------------------------------------------------------------------------------
# Merging


def _expand(cls: type, data: Mapping[str, Any], where: str, seen: tuple[str, ...] = ()) -> dict:
    """Validate ``data`` against ``cls`` recursively, expanding string sub-presets of dataclass sections."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = _fields(cls)
    types = _field_types(cls)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key {(where + '.' if where else '') + str(key)!r}; "
                              f"valid keys{' of ' + where if where else ''}: {valid}")
        sub = _dataclass_of(types[key])
        path = f"{where}.{key}" if where else key
        if sub is not None and isinstance(value, str):
            kind = preset_kind(sub)
            if kind is None:
                raise ConfigError(f"{path}: expected a mapping, got the string {value!r}")
            ppath = preset_path(kind, value)
            if str(ppath) in seen:
                raise ConfigError(f"{path}: preset {ppath} includes itself")
            value = _expand(sub, read_yaml(ppath), path, seen + (str(ppath),))
        elif sub is not None and value is not None:
            value = _expand(sub, value, path, seen)
        out[key] = value
    return out


def _deep_merge(base: dict, extra: Mapping[str, Any], cls: type) -> dict:
    types = _field_types(cls)
    merged = dict(base)
    for k, v in extra.items():
        sub = _dataclass_of(types[k])
        if sub is not None and isinstance(v, Mapping) and isinstance(merged.get(k), Mapping):
            merged[k] = _deep_merge(merged[k], v, sub)
        else:
            merged[k] = v
    return merged


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (["a", "b"], value parsed as YAML: numbers, bools, null, lists)."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _nest(keys: Sequence[str], value: Any) -> dict:
    out: Any = value
    for k in reversed(keys):
        out = {k: out}
    return out


def resolve(cls: type[T], preset: str | None = None, overrides: Sequence[str] = (),
            kind: str | None = None, base: Mapping[str, Any] | None = None) -> T:
    """Build a ``cls`` instance: schema defaults ← ``base`` ← preset ← ``key=value`` overrides.

    ``kind`` names the presets folder (defaults to ``cls.preset_kind``).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    kind = kind or preset_kind(cls)
    data: dict = _expand(cls, dict(base or {}), "")
    if preset:
        if kind is None:
            raise ConfigError(f"{cls.__name__} has no presets")
        ppath = preset_path(kind, preset)
        data = _deep_merge(data, _expand(cls, read_yaml(ppath), "", (str(ppath),)), cls)
    for item in overrides:
        keys, value = parse_override(item)
        data = _deep_merge(data, _expand(cls, _nest(keys, value), ""), cls)
    try:
        structured = OmegaConf.merge(OmegaConf.structured(cls), data)
        obj = OmegaConf.to_object(structured)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"invalid config value for {key}: {first}" if key else f"invalid config value: {first}"
                          ) from e
    _validate_tree(obj)
    return obj  # type: ignore[return-value]


def _validate_tree(obj: Any) -> None:
    """Call ``validate()`` on every (nested) dataclass section, innermost first."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _validate_tree(value)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def save_resolved(cfg: Any, path: str | Path, extra: Mapping[str, Any] | None = None) -> None:
    """Write the resolved config (plus ``extra``, e.g. the package version) atomically as YAML."""
    from omegaconf import OmegaConf

    from rae_cli import __version__
    from rae_cli.checkpoint import atomic_write_text

    data = {"rae_version": __version__, **dict(extra or {}), **to_dict(cfg)}
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(data)))


def load_resolved(cls: type[T], path: str | Path) -> T:
    """Read a config saved by :func:`save_resolved` (extra top-level keys are dropped)."""
    data = read_yaml(Path(path))
    names = set(_fields(cls))
    return resolve(cls, base={k: v for k, v in data.items() if k in names})


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf field, for help screens."""
    rows = []
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        sub = _dataclass_of(types[f.name])
        if sub is not None:
            rows.extend(describe(sub, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "???")
        rows.append((prefix + f.name, repr(default), f.metadata.get("help", "")))
    return rows
