"""The package's structure: no import cycle between its parts, and a generic parallel/ package."""

import ast
import os
import re

import megatron_glm

ROOT = os.path.dirname(megatron_glm.__file__)


def package_imports() -> dict[str, set[str]]:
    """``{part: parts it imports}``, every import counted (module level and inside functions)."""
    graph: dict[str, set[str]] = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            part = os.path.relpath(path, ROOT).split(os.sep)[0].removesuffix(".py")
            for node in ast.walk(ast.parse(open(path).read())):
                modules = (
                    [node.module]
                    if isinstance(node, ast.ImportFrom) and node.module
                    else [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else []
                )
                for module in modules:
                    if module.startswith("megatron_glm.") and module.split(".")[1] != part:
                        graph.setdefault(part, set()).add(module.split(".")[1])
    return graph


def test_no_import_cycle_between_parts():
    graph = package_imports()
    assert graph["model"] and graph["training"]  # the walk saw real imports

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(part for part in graph if part in reach(part))
    assert cycles == [], f"parts that import themselves through others: {cycles}"


def module_imports() -> dict[str, set[str]]:
    """``{module: our modules it imports}``, every import counted (module level and inside functions).

    ``from package import name`` counts the package and, when ``name`` is a module, that module. A
    module's own parent packages are left out: Python runs them before any of their modules anyway.
    """
    modules = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = (
                    os.path.relpath(path, os.path.dirname(ROOT))
                    .removesuffix(".py")
                    .replace(os.sep, ".")
                )
                modules[dotted.removesuffix(".__init__")] = path
    graph = {}
    for module, path in modules.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1]
                        + [base] * bool(base)
                    )
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            found |= {
                n for n in names if n in modules and n != module and not module.startswith(n + ".")
            }
        graph[module] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_between_modules():
    graph = module_imports()
    # the walk saw real imports
    assert "megatron_glm.settings" in graph["megatron_glm.training.config"]
    assert "megatron_glm.checkpoint.format" in graph["megatron_glm.checkpoint.resume"]
    assert cycles(graph) == [], "modules that import themselves through others"


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_parallel_names_no_glm_module():
    names = re.compile(
        r"word_embeddings|query_key_value|dense_h_to_4h|dense_4h_to_h|layernorm|transformer\.layers"
        r"|core_attention|\.cfg\b"
    )
    found = []
    for name in sorted(os.listdir(os.path.join(ROOT, "parallel"))):
        if name.endswith(".py"):
            text = open(os.path.join(ROOT, "parallel", name)).read()
            found += [f"{name}: {m.group(0)}" for m in names.finditer(text)]
    assert found == []


def test_hf_export_code_stands_alone():
    """The files export-hf copies beside the weights load where megatron_glm is not installed."""
    from megatron_glm.convert import hf_files

    folder = os.path.dirname(hf_files.__file__)
    allowed = {"torch", "transformers", "sentencepiece", "tokenizers", "os", "re", "shutil"}
    for name in hf_files.FILES:
        for node in ast.walk(ast.parse(open(os.path.join(folder, name)).read())):
            if isinstance(node, ast.ImportFrom) and node.level:  # the export's own files, beside it
                assert f"{node.module}.py" in hf_files.FILES, (name, node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = (
                    [node.module]
                    if isinstance(node, ast.ImportFrom)
                    else [a.name for a in node.names]
                )
                assert {m.split(".")[0] for m in modules} <= allowed, (name, modules)
