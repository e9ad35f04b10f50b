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
                modules = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
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


def test_parallel_names_no_glm_module():
    names = re.compile(r"word_embeddings|query_key_value|dense_h_to_4h|dense_4h_to_h|layernorm|transformer\.layers"
                       r"|core_attention|\.cfg\b")
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
                modules = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert {m.split(".")[0] for m in modules} <= allowed, (name, modules)
