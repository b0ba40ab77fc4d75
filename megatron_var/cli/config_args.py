"""A command line generated from a tree of dataclasses, and the dataclasses built back from what was parsed.

Why generated: the defaults, the documentation and the validation of every setting are written once, in the
dataclasses (``megatron_var/training/config.py``); the parser only translates. Rules:

* one argument group per nested dataclass: title = the field's name, description = the class docstring;
* one option per leaf field: ``--`` + the name with ``_`` -> ``-`` (or metadata ``flag``); help = the field's
  attribute docstring (the string literal right after it, read from the source, base classes included), followed by
  the dataclass default; type from the annotation (``int``, ``float``, ``str``, ``Optional`` of one of them);
* ``bool``: ``store_true`` when the default is False; Megatron-LM's ``--x`` / ``--no-x`` pair
  (``argparse.BooleanOptionalAction``) when the default is True or metadata ``negatable`` is set;
* metadata ``choices`` and ``required`` go to argparse as they are; fields with metadata ``run_length`` share
  ``RunLength``: the last one given wins (a launcher appends ``--train-iters`` to a script's ``--epochs``);
* no argparse defaults (``argparse.SUPPRESS``): a flag that is not given is absent from the namespace, and the
  dataclass supplies its default. ``config_from_args`` builds the nested objects; their ``__post_init__`` checks
  raise ``ValueError`` for bad values and combinations.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from dataclasses import dataclass
from typing import Any, Optional

_LEAF_TYPES = (bool, int, float, str)


@dataclass(frozen=True)
class Option:
    """One leaf field of the tree and the option that sets it."""

    path: tuple[str, ...]
    """Attribute path from the root, e.g. ``("data", "seed")``."""
    field: dataclasses.Field
    owner: type
    """The dataclass that declares the field."""
    type: type
    """bool, int, float or str (``Optional`` removed)."""
    flag: str
    help: str

    @property
    def dest(self) -> str:
        """The namespace attribute: the flag's name (``--objective`` -> ``objective``), unique like the flags."""
        return _dest(self.flag)

    @property
    def default(self) -> Any:
        return self.field.default


class RunLength(argparse.Action):
    """Options that say the same thing in different units (--train-iters, --train-samples, --epochs): the one given
    last wins, so ``--epochs 2`` of an example script is overridden by ``--train-iters 2000`` appended after it
    (examples/_launch.sh). The others are set to None, which is their dataclass default."""

    def __init__(self, option_strings, dest, siblings: tuple[str, ...] = (), **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.siblings = siblings

    def __call__(self, parser, namespace, values, option_string=None):
        for dest in self.siblings:
            setattr(namespace, dest, None)
        setattr(namespace, self.dest, values)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


@functools.lru_cache(maxsize=None)
def attribute_docs(cls: type) -> dict[str, str]:
    """{field name: attribute docstring} of ``cls`` and its base classes (a subclass's docstring wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = next(n for n in tree.body if isinstance(n, ast.ClassDef)).body
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def _nested(hint) -> Optional[type]:
    """The dataclass a field holds, if it holds one."""
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def _leaf_type(hint, where: str) -> type:
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            hint = args[0]
    if hint not in _LEAF_TYPES:
        raise TypeError(f"{where}: no command-line form for type {hint!r} (bool, int, float, str or Optional[...])")
    return hint


def groups(root: type) -> list[tuple[str, type]]:
    """(field name, dataclass) of every nested dataclass of ``root``, depth first (``--help`` order)."""
    out = []
    hints = typing.get_type_hints(root)
    for f in dataclasses.fields(root):
        sub = _nested(hints[f.name])
        if sub is not None:
            out.append((f.name, sub))
            out.extend((f"{f.name}.{name}", cls) for name, cls in groups(sub))
    return out


def options(root: type, prefix: tuple[str, ...] = ()) -> list[Option]:
    """Every leaf field under ``root`` as an ``Option`` (TypeError for a field the command line cannot express)."""
    out = []
    hints = typing.get_type_hints(root)
    docs = attribute_docs(root)
    for f in dataclasses.fields(root):
        where = f"{root.__name__}.{f.name}"
        if _nested(hints[f.name]) is not None:
            out.extend(options(hints[f.name], prefix + (f.name,)))
            continue
        if not docs.get(f.name):
            raise TypeError(f"{where} has no attribute docstring (its --help text)")
        if f.default is dataclasses.MISSING:
            raise TypeError(f"{where} has no default")
        out.append(Option(prefix + (f.name,), f, root, _leaf_type(hints[f.name], where), _flag(f), docs[f.name]))
    return out


def _help(opt: Option) -> str:
    """The docstring as plain text (no reST literals; ``%`` escaped for argparse) and the default worth showing
    (not None, not the False of a plain switch)."""
    text = opt.help.replace("``", "").replace("%", "%%")
    if opt.field.metadata.get("required"):
        return text + " (required)"
    if opt.default is None or opt.default == "" or (opt.default is False and not opt.field.metadata.get("negatable")):
        return text
    return f"{text} (default: {opt.default})"


def add_arguments(parser: argparse.ArgumentParser, root: type) -> None:
    """One argument group per nested dataclass of ``root``, one option per leaf field."""
    all_options = options(root)
    run_length = tuple(o.dest for o in all_options if o.field.metadata.get("run_length"))
    by_group: dict[tuple[str, ...], list[Option]] = {}
    for opt in all_options:
        by_group.setdefault(opt.path[:-1], []).append(opt)
    titles = {tuple(name.split(".")): cls for name, cls in groups(root)}
    for path, opts in by_group.items():
        target = parser
        if path:
            cls = titles[path]
            target = parser.add_argument_group(".".join(path), (inspect.getdoc(cls) or "").replace("``", ""))
        for opt in opts:
            meta = opt.field.metadata
            kw: dict[str, Any] = dict(dest=opt.dest, default=argparse.SUPPRESS, help=_help(opt))
            if meta.get("required"):
                kw["required"] = True
            if opt.type is bool:
                negatable = meta.get("negatable") or opt.default is True
                kw["action"] = argparse.BooleanOptionalAction if negatable else "store_true"
            else:
                kw["type"] = opt.type
                if "choices" in meta:
                    kw["choices"] = tuple(meta["choices"])
                if meta.get("run_length"):
                    kw.update(action=RunLength, siblings=run_length)
            target.add_argument(opt.flag, **kw)


def build_parser(root: type, **parser_kwargs) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` for the dataclass tree ``root``. Prefixes of options are not accepted
    (``allow_abbrev=False``, as Megatron-LM): ``--lr-warmup`` must not silently mean another flag."""
    parser = argparse.ArgumentParser(allow_abbrev=False, **parser_kwargs)
    add_arguments(parser, root)
    return parser


def config_from_args(namespace: argparse.Namespace, root: type) -> Any:
    """The ``root`` dataclass tree from parsed flags; a field whose flag was not given keeps its default.

    Each nested object is built (and validated by its ``__post_init__``) before the one that holds it, so a
    ``ValueError`` names the first bad setting.
    """
    given = vars(namespace)

    def build(cls: type) -> Any:
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            sub = _nested(hints[f.name])
            if sub is not None:
                kwargs[f.name] = build(sub)
            elif _dest(_flag(f)) in given:
                kwargs[f.name] = given[_dest(_flag(f))]
        return cls(**kwargs)

    return build(root)
