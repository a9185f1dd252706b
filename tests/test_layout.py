"""The layout the README draws: the six technique files import torch, numpy and each other; a fast path, tool or
plumbing module they use is named in their docstring (or pulled in by a technique file they build on, which names
it); mlstm.py imports torch alone. Each file is imported in a fresh interpreter, as a reader's script would."""
import ast
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TECHNIQUES = ("mlstm", "fp16", "distributed", "data", "train", "transfer")
SHOW = """
import json, sys
import {name}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("fast", "tools", "plumbing") and "." in m or
                        m in {techniques})))
"""


def pulled(name):
    """The project modules that `import name` brings in, in a fresh interpreter."""
    p = subprocess.run([sys.executable, "-c", SHOW.format(name=name, techniques=list(TECHNIQUES))], cwd=ROOT,
                       capture_output=True, text=True, check=True)
    return set(json.loads(p.stdout))


@pytest.fixture(scope="module")
def brought():
    return {name: pulled(name) for name in TECHNIQUES}


@pytest.mark.parametrize("name", TECHNIQUES)
def test_a_technique_file_pulls_in_only_what_its_docstring_names(name, brought):
    with open(os.path.join(ROOT, name + ".py")) as f:
        doc = ast.get_docstring(ast.parse(f.read()))
    helpers = {m for m in brought[name] if "." in m}
    builds_on = brought[name] & set(TECHNIQUES) - {name}
    covered = set().union(*(brought[t] for t in builds_on)) if builds_on else set()
    unnamed = sorted(m for m in helpers - covered if m.replace(".", "/") + ".py" not in doc and m not in doc)
    assert not unnamed, f"{name}.py imports {unnamed} without naming them in its docstring"


def test_mlstm_imports_torch_alone(brought):
    with open(os.path.join(ROOT, "mlstm.py")) as f:
        tree = ast.parse(f.read())
    imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"torch"}, imported
    assert brought["mlstm"] == {"mlstm"}, brought["mlstm"]
