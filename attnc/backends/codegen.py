"""What both backends share: printing plan expressions through a target's table, naming common
subexpressions, and rendering a template with StrictUndefined."""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import jinja2

from attnc.frontend.parser import resource_dir
from attnc.ir.expr import Node, Op
from attnc.ir.printer import render


@dataclass
class Target:
    """A backend's printing rules: op table, leaf names and param loads."""
    table: dict[Op, tuple[str, int]]
    leaf: Callable[[Node], str]
    load: Callable[[Node, list[str]], str]
    inplace: dict[Op, tuple[str, int]] | None = None
    donated: Node | None = None
    custom: Callable | None = None

    def text(self, n: Node, names: dict[Node, str] | None = None) -> str:
        return render(n, self.table, self.leaf, names, self.load, self.inplace, self.donated, self.custom)


def linearize(roots: list[tuple[str, Node]], target: Target, names: dict[Node, str],
              prefix: str = "t") -> list[tuple[str, str]]:
    """Assignments computing each root, with a temporary for every subexpression used twice or more.
    `names` (node -> already-bound variable) is extended in place."""
    uses: Counter = Counter()
    seen: set[Node] = set()
    for _, root in roots:
        stack = [root]
        while stack:
            n = stack.pop()
            uses[n] += 1
            if n in seen or n in names:
                continue
            seen.add(n)
            stack.extend(n.src)
    lines: list[tuple[str, str]] = []
    count = 0
    for _, root in roots:
        for n in root.walk():
            if n in names or not n.src or uses[n] < 2 or n is root:
                continue
            count += 1
            name = f"{prefix}{count}"
            lines.append((name, target.text(n, names)))
            names[n] = name
    for name, root in roots:
        if root in names:
            continue
        if not root.src:
            names[root] = target.text(root)         # a leaf needs no variable of its own
            continue
        lines.append((name, target.text(root, names)))
        names.setdefault(root, name)
    return lines


@functools.lru_cache(maxsize=None)
def environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(resource_dir("templates"))),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              trim_blocks=True, lstrip_blocks=True, autoescape=False)


def render_template(name: str, **values) -> str:
    try:
        return environment().get_template(name).render(**values)
    except jinja2.TemplateError as e:
        raise RuntimeError(f"internal: template {name} could not be rendered ({e})") from None
