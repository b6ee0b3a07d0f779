"""The house, read statically from the imports: no import circle anywhere in the package, and every import goes
to the same wing or one below it (kernels and the shared floor, model, train, tasks, eval, study, commands)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "minift"
# Wings from the bottom up. A module's wing is its first folder under minift/; the files directly in minift/ are
# the shared floor (errors, defaults, args) or the commands on top (cli and the `python -m` modules, and
# every __main__.py).
WINGS = ["kernels", "floor", "model", "train", "tasks", "eval", "study", "commands"]
FLOOR = {"minift.errors", "minift.defaults", "minift.args"}


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules():
    return {module_name(p): p for p in PKG.rglob("*.py") if "datasets" not in p.parts}


def imports(path, known):
    """The minift modules that the file imports (at any depth of the file: lazy imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from minift.model import lora` imports the module minift.model.lora
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def wing(mod):
    parts = mod.split(".")
    if len(parts) == 1 or parts[-1] == "__main__":
        return "commands"  # minift/__init__.py: the package's face, re-exports from below
    if len(parts) == 2 and not (PKG / parts[1]).is_dir():
        return "floor" if mod in FLOOR else "commands"
    return parts[1] if parts[1] != "datasets" else "floor"


def graph():
    known = modules()
    return {m: imports(p, known) - {m} for m, p in known.items()}


def test_every_wing_is_known():
    assert {wing(m) for m in graph()} <= set(WINGS), {wing(m) for m in graph()} - set(WINGS)


def test_no_import_circle():
    g = graph()
    state, stack = {}, []

    def visit(m):  # depth-first search; a module met again while on the stack closes a circle
        state[m] = "open"
        stack.append(m)
        for d in sorted(g[m]):
            if state.get(d) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_imports_go_down_the_wings():
    rank = {w: i for i, w in enumerate(WINGS)}
    upward = [f"{m} ({wing(m)}) imports {d} ({wing(d)})" for m, deps in graph().items() for d in deps
              if rank[wing(d)] > rank[wing(m)]]
    assert not upward, upward


def test_the_checker_reads_the_imports():
    # The checks above would pass on an empty graph: it must hold the imports that are there, lazy ones too.
    g = graph()
    assert "minift.model.lora" in g["minift.train.recipes"] or "minift.model.lora" in g["minift.train.launch"]
    assert "minift.kernels" in g["minift.train.losses"]
    assert "minift.train.recipes" in g["minift.cli"]  # inside a function


def test_few_modules_at_the_top_and_a_short_readme_with_a_reading_path():
    assert len(list(PKG.glob("*.py"))) <= 12  # the rest lives in the wings
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 150
    import re

    reading = (ROOT / "docs" / "reading.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:minift|tests)/[\w/]+\.py)", reading))
    assert len(named) >= 10, named  # the path names the files it walks through
    assert not [n for n in named if not (ROOT / n).is_file()], [n for n in named if not (ROOT / n).is_file()]
