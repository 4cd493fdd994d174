"""Configs: one dataclass per stage, and its command-line parser built from it.

Every option is a dataclass field declared with :func:`opt`, which keeps its help next to its default, so
``--help`` lists every option with its default and nothing is written twice. ``--config FILE.yaml`` sets
defaults from a file and the command line wins over it (timm's way: YAML as parser defaults); stages echo
the resolved config into their output folder. Options every stage shares (``--s3-endpoint``, ``--seed``)
come from one place (:data:`COMMON_HELP`).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

COMMON_HELP = {
    "s3_endpoint": "endpoint of an S3-compatible store, e.g. http://127.0.0.1:9000 (or AWS_ENDPOINT_URL)",
    "seed": "random seed (splits, sampling, bootstrap)",
}


def opt(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    flag: str | None = None,
    choices: Sequence[Any] | None = None,
    metavar: str | None = None,
    parse: Callable[[str], Any] | None = None,
    cli: bool = True,
    required: bool = False,
    repeat: bool = False,
) -> Any:
    """A config field with its command-line option.

    ``flag``: the option string (default ``--field-name``; a ``--no-...`` flag on a True bool stores False);
    ``parse``: turns the command-line text into the field's value (e.g. comma lists); ``repeat``: the option
    may be given several times (a list; list fields without ``parse`` are repeatable anyway); ``cli=False``:
    not an option (set by code or YAML only); ``required``: must be given (no usable default)."""
    meta = {"help": help, "flag": flag, "choices": choices, "metavar": metavar}
    meta.update(parse=parse, cli=cli, required=required, repeat=repeat)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def comma_list(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def comma_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(w) for w in comma_list(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def _base_type(tp: Any) -> Any:
    """``int | None`` -> int; ``list[str]`` stays a generic alias."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help; descriptions keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if d is None or d is False or d is argparse.SUPPRESS or d == [] or action.required:
            return text
        if isinstance(action, argparse._StoreFalseAction):
            return text
        default = action.default
        if isinstance(default, (list, tuple)):
            default = ",".join(str(x) for x in default)
        return f"{text} (default: {str(default).replace('%', '%%')})"


def add_options(
    parser: argparse.ArgumentParser, cls: type, *, only: Sequence[str] | None = None, skip: Sequence[str] = ()
) -> None:
    """One option per :func:`opt` field of ``cls`` (in declaration order, or only those named in ``only``),
    typed from its annotation."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in skip or (only is not None and f.name not in only) or not meta.get("cli", False):
            continue
        tp = _base_type(hints[f.name])
        default = _default_of(f)
        kw: dict[str, Any] = {"dest": f.name, "help": meta.get("help") or COMMON_HELP.get(f.name, "")}
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        if tp is bool:
            kw.update(action="store_false" if default else "store_true", default=bool(default))
        else:
            origin = typing.get_origin(tp)
            if meta.get("repeat") or (origin is list and meta.get("parse") is None):
                kw.update(action="append", default=None)  # repeatable; None -> the field's default
            else:
                kw["type"] = meta.get("parse") or (tp if tp in (int, float, str) else str)
                kw["default"] = default
            if meta.get("choices"):
                kw["choices"] = list(meta["choices"])
            if meta.get("metavar"):
                kw["metavar"] = meta["metavar"]
            if meta.get("required"):
                kw["required"] = True
        parser.add_argument(flag, **kw)


def add_config_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="YAML/JSON file of option defaults (field names as keys); options on the command line win",
    )


def from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """``cls`` from parsed arguments: fields the namespace holds (a repeatable option never given keeps the
    field's default), then ``overrides``."""
    kw: dict[str, Any] = {}
    values = vars(args)
    for f in dataclasses.fields(cls):
        if f.name in values and not (values[f.name] is None and f.default_factory is not dataclasses.MISSING):
            kw[f.name] = values[f.name]
    kw.update(overrides)
    return cls(**kw)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping of option names (``image_size`` or ``image-size``) to values."""
    text = Path(path).read_text()
    doc = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping of options, got {type(doc).__name__}")
    return {str(k).replace("-", "_"): v for k, v in doc.items()}


def apply_config_file(parser: argparse.ArgumentParser, path: str | Path, allowed: Sequence[str]) -> None:
    """Make the file's values the parser's defaults (the command line still wins); unknown keys fail."""
    doc = read_config_file(path)
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise ValueError(f"{path}: unknown options {unknown}; known: {sorted(allowed)}")
    parser.set_defaults(**doc)
    for action in parser._actions:  # a required option given by the file is no longer required
        if action.dest in doc:
            action.required = False


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse with ``--config`` applied as defaults first (two passes, as timm does)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        apply_config_file(parser, known.config, [a.dest for a in parser._actions])
    return parser.parse_args(argv)


def echo(cfg: Any) -> str:
    """The resolved config as YAML (tuples as lists), for the run folder."""
    return yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(cfg), default=str)), sort_keys=False)


def stage_parser(cls: type, description: str, add_help: bool = True) -> argparse.ArgumentParser:
    """A stage's parser: every option of its config dataclass, defaults shown, and ``--config FILE``."""
    p = argparse.ArgumentParser(description=description, add_help=add_help, formatter_class=HelpFormatter)
    add_options(p, cls)
    add_config_file(p)
    return p


# ----------------------------------------------------------------------------------------------------------
# Local HTTP servers (``raytumor serve``, ``raytumor review``): one rule for where they may listen.

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token_file: str | None) -> None:
    """Loopback only, unless requests must carry a token: scans and verdicts are not for the whole network."""
    if not is_loopback(host) and not token_file:
        raise ValueError(f"--host {host} is not loopback: give --token-file so requests must authenticate")


def read_token(token_file: str | None) -> str | None:
    """The bearer token in ``token_file`` (None without one); short tokens are refused."""
    if not token_file:
        return None
    token = Path(token_file).read_text().strip()
    if len(token) < 16:
        raise ValueError(f"--token-file {token_file}: the token must be at least 16 characters")
    return token
