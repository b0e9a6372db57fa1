"""The package's own import graph, read from the source (`ast`): no cycle, counting the imports inside
functions and the stage table's module names; an in-package import inside a function only where a
module must stay light (what `import morlaif` and `morlaif --help` load); nobody imports another
module's private names; a stage module is imported only by the pipeline, the CLI, compare, steer and human.
Run with -s to see the graph."""

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "morlaif"
MODULES = {p.stem for p in SRC.glob("*.py")}
MODULE_NAME = re.compile(r"^morlaif\.(\w+)$")


def _imports(path: Path):
    """[(imported module, imported names, inside a function)] of one source file."""
    out = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                parts = child.module.split(".")
                if parts[0] == "morlaif" and len(parts) == 1:  # from morlaif import a, b
                    out.extend((a.name, [], inner) for a in child.names if a.name in MODULES)
                elif parts[0] == "morlaif":  # from morlaif.a import x, y
                    out.append((parts[1], [a.name for a in child.names], inner))
            elif isinstance(child, ast.Import):
                out.extend((a.name.split(".")[1], [], inner) for a in child.names if a.name.startswith("morlaif."))
            elif isinstance(child, ast.Constant) and isinstance(child.value, str):
                m = MODULE_NAME.match(child.value)  # "morlaif.sft" in the stage table, imported by name
                if m and m.group(1) in MODULES:
                    out.append((m.group(1), [], True))
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return out


IMPORTS = {m: _imports(SRC / f"{m}.py") for m in sorted(MODULES)}
GRAPH = {m: sorted({dep for dep, _, _ in imps if dep != m}) for m, imps in IMPORTS.items()}


def _cycle(graph: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in graph[m]:
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := dfs(d)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in graph:
        if m not in state and (found := dfs(m)):
            return found
    return None


def _top_level_closure(roots: set[str]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += [d for d, _, inner in IMPORTS[m] if not inner]
    return seen


def test_import_graph_has_no_cycle():
    print("\nmorlaif import graph (module -> in-package modules it imports, at top level or inside functions):")
    for m, deps in GRAPH.items():
        print(f"  {m:16s} -> {', '.join(deps) or '-'}")
    assert _cycle(GRAPH) is None, f"import cycle: {' -> '.join(_cycle(GRAPH))}"


def test_in_package_imports_inside_functions_only_keep_light_modules_light():
    light = _top_level_closure({"__init__", "cli"})  # what `import morlaif` and `morlaif --help` load
    needless = [(m, dep) for m, imps in IMPORTS.items() for dep, _, inner in imps if inner and m not in light]
    assert not needless, f"in-package imports inside functions of modules that are not kept light: {needless}"
    heavy = {"torch", "transformers", "trl", "peft", "accelerate", "datasets", "ray", "matplotlib"}
    for m in light:
        top = {n.split(".")[0] for n in re.findall(r"^(?:import|from) ([\w.]+)", (SRC / f"{m}.py").read_text(), re.M)}
        assert not top & heavy, f"{m} is loaded by `import morlaif` / `morlaif --help` but imports {top & heavy}"


def test_nobody_imports_another_modules_private_names():
    private = [(m, dep, n) for m, imps in IMPORTS.items() for dep, names, _ in imps for n in names
               if n.startswith("_") and dep != m]
    assert not private, private
    # nor reaches for them as attributes: `module._name`
    for m in MODULES:
        text = (SRC / f"{m}.py").read_text()
        hits = [x for x in re.findall(r"\b(\w+)\._[a-z]\w*", text) if x in MODULES and x != m]
        assert not hits, (m, hits)


# The stage modules (pipeline.STAGES) and who may import them: the pipeline and the CLI run them; compare, steer
# and human measure a finished run (compare trains and evaluates arms through the rl and eval stages, steer draws
# its curve and human its agreement with human labels into the run's report). Everything else shared between
# stages lives in a module of its own (the stage lifecycle: `lifecycle`).
STAGE_MODULES = {"prompts", "sft", "feedback", "reward", "rl", "evaluate", "report"}
STAGE_IMPORTERS = {"pipeline", "cli", "compare", "steer", "human"}
# Today's stages used as libraries (issue 24, item 3), each an import to move, not a rule: a name listed here
# goes to a module of its own, then its line goes. The test fails for a new one and for one that is gone.
KNOWN_STAGE_IMPORTS: set[tuple[str, str]] = set()


def test_stage_modules_are_imported_only_by_the_pipeline_cli_and_the_run_measures():
    found = {(m, dep) for m, imps in IMPORTS.items() for dep, _, _ in imps
             if dep in STAGE_MODULES and dep != m and m not in STAGE_IMPORTERS}
    assert not found - KNOWN_STAGE_IMPORTS, f"a stage module used as a library: {sorted(found - KNOWN_STAGE_IMPORTS)}"
    gone = sorted(KNOWN_STAGE_IMPORTS - found)
    assert not gone, f"no longer imported, remove from KNOWN_STAGE_IMPORTS: {gone}"
    # the lifecycle every stage asks knows no stage
    assert not {dep for dep, _, _ in IMPORTS["lifecycle"]} & STAGE_MODULES
