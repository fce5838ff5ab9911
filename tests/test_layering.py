"""The package's layer order, enforced by walking its imports (AST, no import executed).

Top to bottom (docs/architecture.md): command line → whole-model tools → nn layers → ops →
backends → kernels (reference, triton) → shared leaves. A module may import its own layer or any
layer below; never above. The module-level imports form no cycle, and an import inside a function
(the CLI's lazy imports) must be one that would be legal at module level too: no import hides in a
function to dodge a cycle.
"""
import ast
from pathlib import Path

import cersa_kernels

PACKAGE = Path(cersa_kernels.__file__).parent

# (layer, module-name prefixes), top first. The package's own __init__ re-exports everything.
LAYERS = [
    ("cli", ("__main__", "analyze", "demo", "doctor", "compare")),
    ("whole-model", ("model", "checkpoint", "para", "para_peft", "peft_interop")),
    ("nn", ("nn",)),
    ("ops", ("ops", "_alloc")),
    ("backends", ("backends",)),
    ("kernels", ("reference", "triton")),
    ("leaves", ("_checks", "_cli_checks", "_adapter_files", "_progress", "config", "decompose", "quant")),
]


def layer_of(module: str) -> int:
    parts = module.split(".")[1:]  # without "cersa_kernels"
    for index, (_, prefixes) in enumerate(LAYERS):
        if parts and parts[0] in prefixes:
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_layering.py: add it to LAYERS")


def module_name(path: Path) -> str:
    parts = ("cersa_kernels",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported cersa_kernels module, inside a function?, line) for every import in `path`."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                    names = [target] if child.module else [f"{target}.{a.name}" for a in child.names]
                else:
                    names = [child.module] if (child.module or "").startswith("cersa_kernels") else []
                found.extend((n, nested, child.lineno) for n in names)
            elif isinstance(child, ast.Import):
                found.extend((a.name, nested, child.lineno) for a in child.names if a.name.startswith("cersa_kernels"))
            visit(child, nested)

    visit(ast.parse(path.read_text()), False)
    return found


def existing(name: str) -> str:
    """`name`, or its package when `name` is an attribute (`from . import cuda` names a module;
    `from .x import y` is resolved to module x by the caller)."""
    parts = name.split(".")
    while parts:
        candidate = PACKAGE.parent.joinpath(*parts)
        if candidate.with_suffix(".py").exists() or (candidate / "__init__.py").exists():
            return ".".join(parts)
        parts.pop()
    raise AssertionError(f"import of {name} names no module of the package")


def import_graph():
    """{module: {imported module: (inside a function?, line)}}; the package root counts as a module."""
    graph: dict[str, dict[str, tuple[bool, int]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        edges = graph.setdefault(module, {})
        for name, in_function, line in package_imports(path):
            target = existing(name)
            if target != module:
                edges.setdefault(target, (in_function, line))
    return graph


def test_every_import_goes_down_the_layers():
    wrong = []
    for module, edges in import_graph().items():
        if module == "cersa_kernels":
            continue
        for target, (in_function, line) in edges.items():
            if target == "cersa_kernels":  # the public API: for the command line only
                if layer_of(module) > 0:
                    wrong.append(f"{module}:{line} imports the package root")
            elif layer_of(target) < layer_of(module):
                wrong.append(
                    f"{module}:{line} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
                )
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_no_import_cycle_even_counting_imports_inside_functions():
    graph = {m: set(edges) for m, edges in import_graph().items()}
    state: dict[str, int] = {}  # 1 visiting, 2 done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for target in graph.get(node, ()):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state and module != "cersa_kernels":  # the root imports everything by design
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_inside_functions_are_only_the_command_line_s_lazy_ones():
    # a function-level import of a package module below the CLI layer is an import hiding a cycle
    # (or a cost) that should be at the top of the file
    hidden = [
        f"{module}:{line} imports {target} inside a function"
        for module, edges in import_graph().items()
        if module != "cersa_kernels" and layer_of(module) > 0
        for target, (in_function, line) in edges.items()
        if in_function
    ]
    assert not hidden, "\n".join(hidden)


def test_the_walker_sees_the_imports():
    # the checks above would pass vacuously if the walker found no imports: it must find these
    assert ("cersa_kernels.ops._define", False) in {
        (existing(n), f) for n, f, _ in package_imports(PACKAGE / "ops" / "lowrank.py")
    }
    assert layer_of("cersa_kernels.model") < layer_of("cersa_kernels.nn.base") < layer_of("cersa_kernels.backends")
