"""The house rules of the source tree, checked on the code itself: no import cycle between gradspace's modules."""

from __future__ import annotations

import ast
from pathlib import Path

import gradspace

SRC = Path(gradspace.__file__).parent


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The gradspace modules ``path`` imports, at any depth (a lazy import inside a function is still an edge):
    ``from pkg import name`` is an edge to ``pkg.name`` where that is a module, else to ``pkg``."""
    name = _module(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                target = f"{source}.{alias.name}"
                if target in modules:
                    out.add(target)
                elif source in modules:
                    out.add(source)
    return out - {name}


def test_no_import_cycle_in_src():
    files = {_module(p): p for p in SRC.rglob("*.py")}
    graph = {name: _imports(path, set(files)) for name, path in files.items()}
    done, path = set(), []

    def visit(mod):
        assert mod not in path, f"import cycle: {' -> '.join([*path[path.index(mod) :], mod])}"
        if mod not in done:
            path.append(mod)
            for dep in sorted(graph[mod]):
                visit(dep)
            path.pop()
            done.add(mod)

    for mod in sorted(graph):
        visit(mod)


def test_the_error_types_and_the_option_grammar_are_leaves():
    """Any module may raise the run's errors or read options without importing more of gradspace."""
    for leaf in (SRC / "train" / "errors.py", SRC / "optim_args.py"):
        assert _imports(leaf, {_module(p) for p in SRC.rglob("*.py")}) == set(), leaf


def test_a_run_does_not_import_the_baselines_packages():
    """peft pulls in bitsandbytes and badam pulls in transformers.Trainer: tens of MB a run of another method must
    not hold (the planner's measured baseline would count them)."""
    import subprocess
    import sys

    probe = (
        "import sys, gradspace.cli, gradspace.train.trainer, gradspace.train.recipes, gradspace.baselines\n"
        "print(sorted(m for m in ('peft', 'badam', 'bitsandbytes') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stdout
