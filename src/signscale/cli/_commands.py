"""How command modules plug into ``signscale``: each ``cli/*.py`` has ``register(r: Commands)``.

A module adds its commands with ``r.add(name, run, help)`` (or under a group such as ``bench`` or
``data`` with ``parent=``) and may list the exceptions that mean "bad input" in ``errors()``; those
end as one red line and exit code 2 instead of a traceback.

One convention for every command (the :class:`Parser` below): ``--key value`` and ``--key=value``
mean the same, ``--max_steps`` and ``--max-steps`` too; options are never abbreviated (``--epoch``
is not ``--epochs``: an abbreviation that works today breaks silently when a longer option is
added); an unknown option is a usage error (exit 2) that names the closest valid one. Commands
built on a config dataclass get one option per key from :func:`add_config`, with the key's type,
default and comment as its help, so the help and the code cannot drift apart.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console

# soft_wrap: a summary line is printed whole (the terminal wraps it, a pipe keeps it one line);
# rich's default hard-wraps at 80 columns when stdout is not a terminal, mid-phrase.
console = Console(stderr=False, highlight=False, soft_wrap=True)

Run = Callable[[argparse.Namespace], int]

GROUPS = {
    "data": "inspect packed datasets",
    "bench": "benchmarks that print side-by-side figures",
    "registry": "model versions and aliases (production, candidate, previous)",
    "continual": "the continual-learning loop: ingest, retrain, gate, promote",
}

# Sections of a command's --help, in this order (config.GROUPS decides which key goes where).
SECTIONS = ("data", "model", "optimisation", "precision", "distributed", "service", "output", "other")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks (examples stay copyable); option help starts at column 34."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34)


class Parser(argparse.ArgumentParser):
    """argparse with the house convention (see the module docstring); sub-parsers inherit it."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        kw.setdefault("allow_abbrev", False)
        kw.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kw)
        self.mappings: dict[str, str] = {}  # "--country-weights" -> its key, for --country-weights.cn=4
        self.rest: str | None = None  # dest of a trailing key=value positional that takes stray ones
        self.lazy: list[Callable[[], None]] = []  # options added on first use (their config imports torch)
        self._argv: list[str] = []

    def materialise(self) -> None:
        while self.lazy:
            self.lazy.pop(0)()

    def format_help(self) -> str:
        self.materialise()
        return super().format_help()

    def format_usage(self) -> str:
        self.materialise()
        return super().format_usage()

    # -- parsing

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        self.materialise()
        argv = self._normalise(list(sys.argv[1:] if args is None else args))
        self._argv = argv
        ns, extras = super().parse_known_args(argv, namespace)
        if extras and self.rest is not None:
            # argparse hands out a trailing nargs="*" positional before later options are read, so
            # key=value items after an option arrive here; they belong to that positional
            stray = [e for e in extras if not e.startswith("-") and "=" in e]
            if stray:
                setattr(ns, self.rest, [*(getattr(ns, self.rest, None) or []), *stray])
                extras = [e for e in extras if e not in stray]
        if extras and self._is_command():
            self._unknown(extras)
        return ns, extras

    def _is_command(self) -> bool:
        """True for a parser whose unknown arguments cannot belong to anyone else."""
        return not any(isinstance(a, argparse._SubParsersAction) for a in self._actions)

    def _normalise(self, argv: list[str]) -> list[str]:
        """``--max_steps=1`` -> ``--max-steps=1``; ``--country-weights.cn 4`` -> ``--country-weights cn=4``."""
        out: list[str] = []
        i = 0
        while i < len(argv):
            tok = argv[i]
            i += 1
            if tok == "--":
                out.extend(argv[i - 1:])
                break
            if not tok.startswith("--") or len(tok) < 3:
                out.append(tok)
                continue
            name, eq, value = tok.partition("=")
            name = name.replace("_", "-")
            for opt in self.mappings:
                if name.startswith(opt + "."):
                    sub = name[len(opt) + 1:]
                    if not eq and i < len(argv):
                        value, eq, i = argv[i], "=", i + 1
                    if not eq:
                        self.error(f"{tok}: expected a value, e.g. {tok}=VALUE")
                    out.extend([opt, f"{sub}={value}"])
                    break
            else:
                out.append(name + eq + value)
        return out

    # -- errors

    def _options(self) -> list[str]:
        return [o for a in self._actions for o in a.option_strings if o.startswith("--")]

    def _unknown(self, extras: list[str]) -> None:
        options = [e for e in extras if e.startswith("-") and len(e) > 1]
        if not options:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        from signscale.config import closest

        name = options[0].split("=", 1)[0]
        near = closest(name, self._options())
        if near is None and "." in name:  # --augment.flipp: compare the dotted keys only
            near = closest(name, [o for o in self._options() if "." in o])
        hint = f"; did you mean {near}?" if near else f"; see {self.prog} --help"
        self.error(f"unrecognized option {name}{hint}")

    def error(self, message: str) -> Any:  # type: ignore[override]
        if message.startswith("the following arguments are required") and self._is_command():
            known = set(self._option_string_actions)
            typo = [t for t in self._argv if t.startswith("--") and t.split("=", 1)[0] not in known and t != "--"]
            if typo:  # `predict --topk 3`: the typo is the news, not the missing positionals
                self._unknown(typo)
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            from signscale.config import closest

            near = closest(m.group(1), re.findall(r"'([^']*)'", m.group(2)))
            if near:
                message += f"; did you mean '{near}'?"
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------------------------------
# Options from config dataclasses


class _KeyAction(argparse.Action):
    """Appends ``key=value`` to ``namespace.config_items`` (config.load's overrides), in command-line order."""

    def __init__(self, option_strings: list[str], dest: str, *, key: str, mapping: bool = False,
                 invert: bool = False, **kw: Any) -> None:
        super().__init__(option_strings, dest, **kw)
        self.key, self.mapping, self.invert = key, mapping, invert

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        items = list(getattr(namespace, "config_items", None) or [])
        if self.invert:  # --no-detection
            items.append(f"{self.key}=false")
        elif self.mapping:
            from signscale.config import split_pairs

            for pair in split_pairs(str(values)):
                k, sep, v = pair.partition("=")
                if not sep or not k:
                    parser.error(f"{option_string} {values!r}: expected KEY=VALUE pairs, e.g. "
                                 f"{option_string} de=1,cn=2 or {option_string}.cn=2 (a list: widths=48,96,192)")
                items.append(f"{self.key}.{k.strip()}={v.strip()}")
        else:
            items.append(f"{self.key}={values}")
        namespace.config_items = items


def _help(key: Any) -> str:
    from signscale.config import show_value

    text = key.help.rstrip(".")
    default = "required" if key.required else f"default: {show_value(key.default)}"
    if key.type == "bool" and key.default is True:
        default += f"; --no-{key.name.replace('_', '-')} for false"
    return (f"{text} ({default})" if text else f"({default})").replace("%", "%%")


def _metavar(type_name: str) -> str:
    return type_name if type_name.startswith("{") else type_name.upper()


def add_config(p: Parser, cls: str, *, skip: Sequence[str] = (), aliases: dict[str, Sequence[str]] | None = None,
               rest: bool = True, rest_help: str = "", yaml_first: bool = False) -> None:
    """One option per key of the config class ``cls`` ("module:Class") in grouped sections.

    The values land in ``args.config_items`` as key=value. ``skip``: keys the command takes as
    positionals. ``rest``: also take ``key=value`` items (Ultralytics' style, and what YAML-minded
    users type) in ``args.overrides``; :func:`config_args` returns both. The options are added when
    the command is parsed or its help printed, so ``signscale --help`` imports no config module.
    """
    p.set_defaults(config_items=[], overrides=[])
    p.lazy.append(lambda: _add_config_now(p, cls, skip=skip, aliases=aliases or {}, rest=rest, rest_help=rest_help,
                                          yaml_first=yaml_first))


def _add_config_now(p: Parser, spec: str, *, skip: Sequence[str], aliases: dict[str, Sequence[str]], rest: bool,
                    rest_help: str, yaml_first: bool) -> None:
    import importlib

    from signscale.config import keys

    module, _, name = spec.partition(":")
    cls = getattr(importlib.import_module(module), name)
    sections: dict[str, argparse._ArgumentGroup] = {}
    by_group: dict[str, list[Any]] = {}
    for k in keys(cls):
        if k.name in skip or k.name.split(".")[0] in skip:
            continue
        by_group.setdefault(k.group if k.group in SECTIONS else "other", []).append(k)
    for group in SECTIONS:
        for k in by_group.get(group, []):
            if group not in sections:
                sections[group] = p.add_argument_group(f"{group} ({cls.__name__} keys)")
            opt = "--" + k.name.replace("_", "-")
            extra = list(aliases.get(k.name, ()))
            kw: dict[str, Any] = {"key": k.name, "mapping": k.mapping, "help": _help(k),
                                  "metavar": _metavar(k.type), "default": argparse.SUPPRESS}
            if k.type == "bool":
                kw.update(nargs="?", const="true", metavar="BOOL")
            sections[group].add_argument(opt, *extra, action=_KeyAction, **kw)
            if k.mapping:
                p.mappings[opt] = k.name
            if k.type == "bool" and f"--no-{opt[2:]}" not in p._option_string_actions:
                sections[group].add_argument(f"--no-{opt[2:]}", action=_KeyAction, key=k.name, invert=True,
                                             nargs=0, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    def shown(a: argparse.Action) -> str:
        name = str(a.metavar or a.dest)
        return {"+": f"{name} [{name} ...]", "*": f"[{name} ...]", "?": f"[{name}]"}.get(str(a.nargs), name)

    positionals = " ".join(shown(a) for a in p._actions if not a.option_strings)
    tail = (" [CONFIG.yaml]" if yaml_first else "") + (" [KEY=VALUE ...]" if rest else "")
    p.usage = f"%(prog)s [-h] {positionals} [--KEY VALUE ...]{tail}".replace("  ", " ")
    if rest:
        p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                       help=rest_help or f"{cls.__name__} keys as key=value, the same as --key value")
        p.rest = "overrides"


def config_args(args: argparse.Namespace) -> list[str]:
    """The key=value overrides a command line gave, positional ones first, then the --key options."""
    return [*getattr(args, "overrides", []), *getattr(args, "config_items", [])]


class Commands:
    """Wraps argparse's subparsers so modules can add commands and sub-commands in any order."""

    def __init__(self, sub: Any) -> None:
        self._sub = sub
        self._groups: dict[str, Any] = {}

    def group(self, name: str) -> Any:
        if name not in self._groups:
            p = self._sub.add_parser(name, help=GROUPS.get(name, name))
            self._groups[name] = p.add_subparsers(dest=f"{name}_cmd", metavar="SUBCOMMAND", required=True)
        return self._groups[name]

    def add(self, name: str, run: Run, help: str, *, parent: str | None = None,
            **kw: Any) -> Parser:
        sub = self.group(parent) if parent else self._sub
        p = sub.add_parser(name, help=help, **kw)
        p.set_defaults(run=run)
        return p


__all__ = ["Commands", "Parser", "add_config", "config_args", "console"]
