"""What each DVC stage executes: the project modules its command imports, found statically.

Shared by tests/test_stage_deps.py (every executed module is a dependency of its stage) and
tests/test_pipeline.py (editing one makes `dvc status` report exactly the stages that execute it).

A stage command is `python -m MODULE ...` (runs MODULE's packages' `__init__.py` files, then
MODULE) or `python SCRIPT.py ...`. From there every `import` / `from ... import` statement of an
executed module is followed, wherever it is (module level, functions, methods: lazy imports are
still imports), except inside `if TYPE_CHECKING:` blocks, which never run. Only the project's
packages (PACKAGES) are followed. Importing `a.b.c` executes `a/__init__.py`, `a/b/__init__.py` and
`a/b/c.py`; `from a.b import c` imports the submodule `a.b.c` when there is one, else the name
`c` comes from `a/b/__init__.py`: through its lazy export table when it has one (see
`is_declarative_init`), in which case the table's module is imported too.
"""

from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

PACKAGES = ("tracer", "pipelines", "dashboards")
PYTHON = "python"
INTERPOLATION = re.compile(r"\$\{([^}]*)\}")
CONSULTED = ".__init__"  # marks `pkg.__init__`: a name taken from the package itself


# ---- dvc.yaml ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    name: str  # as DVC names it: `attribute@gpt2-clt` for a foreach stage
    cmd: str
    deps: tuple[str, ...]
    uncached: tuple[str, ...] = ()  # outs, metrics and plots declared `cache: false`


def _lookup(dotted: str, variables: dict) -> object:
    value: object = variables
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"dvc.yaml interpolates ${{{dotted}}}, which params.yaml lacks")
        value = value[part]
    return value


def _substitute(text: str, variables: dict) -> str:
    def one(match: re.Match) -> str:
        value = _lookup(match.group(1).strip(), variables)
        if isinstance(value, dict | list):
            raise ValueError(f"${{{match.group(1)}}} in {text!r} is not a scalar")
        return str(value)

    return INTERPOLATION.sub(one, text)


def dvc_stages(root: Path) -> list[Stage]:
    """Every stage of `root/dvc.yaml`, `foreach` stages expanded over params.yaml's values."""
    definitions = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    stages = []
    for name, body in definitions.items():
        if "foreach" not in body:
            instances = [(name, body, params)]
        else:
            match = INTERPOLATION.fullmatch(body["foreach"].strip())
            if match is None:
                raise ValueError(f"stage {name}: foreach must be one ${{...}} reference")
            items = _lookup(match.group(1).strip(), params)
            if not isinstance(items, dict):
                raise ValueError(f"stage {name}: foreach over {type(items).__name__} unsupported")
            instances = [
                (f"{name}@{key}", body["do"], params | {"key": key, "item": value})
                for key, value in items.items()
            ]
        for stage_name, stage, variables in instances:
            deps = tuple(_substitute(dep, variables) for dep in stage.get("deps", []))
            uncached = tuple(
                _substitute(path, variables)
                for kind in ("outs", "metrics", "plots")
                for out in stage.get(kind, [])
                if isinstance(out, dict)
                for path, options in out.items()
                if options.get("cache", True) is False
            )
            cmd = _substitute(stage["cmd"], variables)
            stages.append(Stage(stage_name, cmd, deps, uncached))
    return stages


def covers(dep: str, path: str) -> bool:
    """Whether DVC dependency `dep` (a file or a folder) includes the file `path`."""
    dep = dep.rstrip("/")
    return path == dep or path.startswith(dep + "/")


# ---- modules -----------------------------------------------------------------------------------
def module_file(root: Path, name: str) -> Path | None:
    """The file of project module `name` (a package's `__init__.py`), None if there is none."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _executed_nodes(tree: ast.AST):
    """Every node of `tree`, except what sits under `if TYPE_CHECKING:` (not its `else`)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def is_declarative_init(tree: ast.Module) -> bool:
    """True for a package `__init__.py` that runs no code of its own on import.

    Every top-level statement must be one of: a string expression (the docstring); an import
    (what it imports is followed like any other import); an `if TYPE_CHECKING:` block of imports
    (never runs); an assignment of a literal value (`ast.literal_eval` accepts it: `__all__`, a
    version string, the lazy export table of name -> module strings); `__all__ = sorted(NAME)`
    (or `list(NAME)`, `tuple(NAME)`: the table's keys); or `def __getattr__` /
    `def __dir__` (module hooks that run on attribute access only). Such a file is no dependency
    of a stage by itself: it becomes one when the stage takes a name from it that is not a
    submodule (through the lazy table or not), see `imported_names`.
    """
    for statement in tree.body:
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
            if isinstance(statement.value.value, str):
                continue
        elif isinstance(statement, ast.Import | ast.ImportFrom):
            continue
        elif isinstance(statement, ast.If) and _type_checking(statement.test):
            if not statement.orelse and all(
                isinstance(s, ast.Import | ast.ImportFrom) for s in statement.body
            ):
                continue
        elif isinstance(statement, ast.Assign | ast.AnnAssign) and statement.value is not None:
            if _names_of_a_table(statement):
                continue
            try:
                ast.literal_eval(statement.value)
            except ValueError:
                return False
            continue
        elif isinstance(statement, ast.FunctionDef) and statement.name in (
            "__getattr__",
            "__dir__",
        ):
            continue
        return False
    return True


def _names_of_a_table(statement: ast.Assign | ast.AnnAssign) -> bool:
    """`__all__ = sorted(NAME)` (or list / tuple): the export table's keys."""
    targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
    value = statement.value
    return (
        [getattr(t, "id", None) for t in targets] == ["__all__"]
        and isinstance(value, ast.Call)
        and isinstance(value.func, ast.Name)
        and value.func.id in ("sorted", "list", "tuple")
        and len(value.args) == 1
        and isinstance(value.args[0], ast.Name)
        and not value.keywords
    )


def lazy_exports(tree: ast.Module) -> dict[str, str]:
    """The table a module `__getattr__` imports from: every top-level dict of str -> str."""
    if not any(isinstance(s, ast.FunctionDef) and s.name == "__getattr__" for s in tree.body):
        return {}
    table: dict[str, str] = {}
    for statement in tree.body:
        if isinstance(statement, ast.Assign | ast.AnnAssign) and statement.value is not None:
            try:
                value = ast.literal_eval(statement.value)
            except ValueError:
                continue
            if isinstance(value, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                table |= value
    return table


def _absolute(name: str, level: int, package: str) -> str:
    """`from .x import y` in package `package` -> the absolute module name `package.x`."""
    if level == 0:
        return name
    parts = package.split(".")
    base = parts[: len(parts) - level + 1]
    return ".".join([*base, name] if name else base)


@dataclass(frozen=True)
class Execution:
    files: frozenset[str]  # every project file executed, relative to the root (POSIX)
    consulted: frozenset[str]  # `__init__.py` files the code takes a non-module name from

    def required(self, graph: ImportGraph) -> set[str]:
        """The files the stage must depend on: all, less declarative packages not consulted."""
        return {
            path
            for path in self.files
            if not path.endswith("__init__.py")
            or path in self.consulted
            or not is_declarative_init(graph.tree(graph.root / path))
        }


class ImportGraph:
    """The project modules (files) a command executes, from the sources under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self._trees: dict[Path, ast.Module] = {}

    def tree(self, path: Path) -> ast.Module:
        if path not in self._trees:
            self._trees[path] = ast.parse(path.read_text(), filename=str(path))
        return self._trees[path]

    def entry(self, cmd: str) -> tuple[str | None, Path]:
        """(module name, or None for a script; its file) that `cmd` runs."""
        argv = shlex.split(cmd)
        if len(argv) >= 3 and argv[0] == PYTHON and argv[1] == "-m":
            path = module_file(self.root, argv[2])
            if path is None:
                raise ValueError(f"{cmd!r}: no project module {argv[2]}")
            return argv[2], path
        if len(argv) >= 2 and argv[0] == PYTHON and argv[1].endswith(".py"):
            return None, self.root / argv[1]
        raise ValueError(f"{cmd!r} is neither `python -m MODULE` nor `python SCRIPT.py`")

    def execute(self, cmd: str) -> Execution:
        """What `cmd` executes of the project, statically."""
        name, path = self.entry(cmd)
        files: dict[Path, str | None] = {}
        consulted: set[Path] = set()
        pending: list[tuple[str | None, Path]] = []

        def import_module(module: str) -> None:
            """Queue `module` and, first, its packages' `__init__.py` files."""
            parts = module.split(".")
            for i in range(1, len(parts) + 1):
                file = module_file(self.root, ".".join(parts[:i]))
                if file is not None:
                    pending.append((".".join(parts[:i]), file))

        if name is None:
            pending.append((None, path))
        else:
            import_module(name)
        while pending:
            module, file = pending.pop()
            if file in files:
                continue
            files[file] = module
            for target in self.imports(module, file):
                if target.endswith(CONSULTED):
                    consulted.add(module_file(self.root, target.removesuffix(CONSULTED)))
                else:
                    import_module(target)
        return Execution(
            frozenset(f.relative_to(self.root).as_posix() for f in files),
            frozenset(f.relative_to(self.root).as_posix() for f in consulted),
        )

    def imports(self, module: str | None, file: Path) -> list[str]:
        """Absolute names of the project modules `file` imports, lazily or not; `PKG.__init__`
        marks a package whose `__init__.py` the file takes a name from."""
        package = module if file.name == "__init__.py" else (module or "").rpartition(".")[0]
        tree = self.tree(file)
        # a lazy table's __getattr__ imports dynamically: `imported_names` follows the table
        hooks = {
            id(node)
            for hook in tree.body
            if isinstance(hook, ast.FunctionDef) and hook.name == "__getattr__"
            if lazy_exports(tree)
            for node in ast.walk(hook)
        }
        found: list[str] = []
        for node in _executed_nodes(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found.append(alias.name)
                    if lazy_exports(self.package_tree(alias.name)):  # `import pkg; pkg.NAME`
                        found += [alias.name + CONSULTED, *self.table_modules(alias.name)]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node.module or "", node.level, package)
                if base.split(".")[0] not in PACKAGES:
                    continue
                found.append(base)
                for alias in node.names:
                    found += self.imported_names(base, alias.name)
            elif isinstance(node, ast.Call) and _dynamic_import(node) and id(node) not in hooks:
                raise ValueError(
                    f"{file}:{node.lineno}: a dynamic import this check cannot follow; import "
                    "statically, or through a package's lazy export table"
                )
        return found

    def package_tree(self, name: str) -> ast.Module:
        """The AST of package `name`'s `__init__.py`; an empty module for anything else."""
        init = module_file(self.root, name)
        if init is None or init.name != "__init__.py":
            return ast.Module(body=[], type_ignores=[])
        return self.tree(init)

    def table_modules(self, base: str, names: list[str] | None = None) -> list[str]:
        """The modules package `base`'s lazy export table imports for `names` (None: all)."""
        table = lazy_exports(self.package_tree(base))
        targets = table.values() if names is None else [table[n] for n in names if n in table]
        return [_absolute(t.lstrip("."), len(t) - len(t.lstrip(".")), base) for t in targets]

    def imported_names(self, base: str, name: str) -> list[str]:
        """What `from base import name` imports besides `base` itself: for a name of the lazy
        export table of `base/__init__.py`, the table (consulted) and its module; else the
        submodule `name` if there is one; else the name comes from `base/__init__.py`."""
        table = lazy_exports(self.package_tree(base))
        if name in table or name == "*" and table:  # as Python: the package's attributes first
            return [base + CONSULTED, *self.table_modules(base, None if name == "*" else [name])]
        if module_file(self.root, f"{base}.{name}") is not None:
            return [f"{base}.{name}"]
        init = module_file(self.root, base)
        if init is None or init.name != "__init__.py":
            return []  # `from module import name`: the module is what runs
        return [base + CONSULTED]


def _dynamic_import(call: ast.Call) -> bool:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id in ("__import__", "import_module")
    return isinstance(func, ast.Attribute) and func.attr == "import_module"
