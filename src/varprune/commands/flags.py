"""The training flags, derived from the configuration's field declarations (engine/config.py): one flag per
field, with its help and default; absent flags stay absent, so a command knows what was given explicitly."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

from varprune.engine.config import FIELDS, TrainConfig, _kinds, flag_of


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _default(f: dataclasses.Field):
    """A field's default value (a fresh one for list and dict fields)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def add_flags(parser: argparse.ArgumentParser, exclude=()) -> None:
    """One flag per field, with its help and default; absent flags stay absent (argparse.SUPPRESS)."""
    for name, f in FIELDS.items():
        m = f.metadata
        if not m["flag"] or name in exclude:
            continue
        kind = _kinds(f)[0]
        default = _default(f)
        text = m["help"] + (
            ""
            if default is None or kind == "bool"
            else f" (default {default:g})"
            if isinstance(default, float)
            else f" (default {default})"
        )
        if kind == "dict":
            parser.add_argument(
                flag_of(name),
                dest=name,
                type=_key_value,
                action="append",
                default=argparse.SUPPRESS,
                help=m["help"],
                metavar=m["metavar"],
            )
            if flag_of(name) != "--" + name.replace("_", "-"):  # the field's own name (0.2's), kept but not shown
                parser.add_argument(
                    "--" + name.replace("_", "-"),
                    dest=name,
                    type=_key_value,
                    action="append",
                    default=argparse.SUPPRESS,
                    help=argparse.SUPPRESS,
                )
            continue
        if kind == "bool":
            if default:
                parser.add_argument(
                    "--no-" + name.replace("_", "-"),
                    dest=name,
                    action="store_false",
                    default=argparse.SUPPRESS,
                    help="no " + m["help"],
                )
            else:
                parser.add_argument(flag_of(name), dest=name, action="store_true", default=argparse.SUPPRESS, help=text)
        else:
            types: dict[str, Callable[[str], object]] = {
                "int": int,
                "float": float,
                "str": str,
                "list[float]": _floats,
                "list[str]": _names,
            }
            typ = types[kind]
            parser.add_argument(
                flag_of(name),
                *m["aliases"],
                dest=name,
                type=typ,
                default=argparse.SUPPRESS,
                help=text,
                metavar=m["metavar"],
            )


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for cast in (int, float):
        try:
            return key.strip(), cast(value)
        except ValueError:
            pass
    return key.strip(), {"true": True, "false": False}.get(value.lower(), value)


def given_fields(args: argparse.Namespace) -> dict:
    """The configuration fields present on the command line."""
    values = {k: v for k, v in vars(args).items() if k in FIELDS}
    for name, f in FIELDS.items():
        if name in values and _kinds(f)[0] == "dict" and isinstance(values[name], list):
            values[name] = dict(values[name])
    return values


def from_args(args: argparse.Namespace, **overrides) -> TrainConfig:
    values = given_fields(args)
    values.update(overrides)
    return TrainConfig(**values)
