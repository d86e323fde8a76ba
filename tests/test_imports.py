"""The package's module-level imports form no cycle (each room imports only
the rooms below it; lazy imports inside functions are not counted)."""

import ast
import os

import bcl_jax

ROOT = os.path.dirname(bcl_jax.__file__)


def module_graph() -> dict[str, set[str]]:
  graph = {}
  for folder, _, files in os.walk(ROOT):
    for f in files:
      if not f.endswith(".py"):
        continue
      path = os.path.join(folder, f)
      rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3]
      name = rel.replace(os.sep, ".").removesuffix(".__init__")
      tree = ast.parse(open(path).read())
      deps = set()
      for node in tree.body:  # module level only
        if isinstance(node, ast.ImportFrom) and node.module and \
            node.module.startswith("bcl_jax"):
          deps.add(node.module)
          deps.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
          deps.update(a.name for a in node.names
                      if a.name.startswith("bcl_jax"))
      graph[name] = deps
  return {k: {d for d in v if d in graph and d != k} for k, v in graph.items()}


def test_no_import_cycle():
  graph = module_graph()
  assert "bcl_jax.train" in graph and "bcl_jax.data.images" in graph
  state: dict[str, int] = {}   # 1: on the stack, 2: done

  def visit(m, stack):
    state[m] = 1
    for d in sorted(graph[m]):
      if state.get(d) == 1:
        cycle = stack[stack.index(d):] + [d]
        raise AssertionError("import cycle: " + " -> ".join(cycle))
      if d not in state:
        visit(d, stack + [d])
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
