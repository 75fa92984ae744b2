"""The package's modules import each other without cycles (deferred imports included).

The graph is read from the source with ``ast``: every ``import`` statement counts, at
module level or inside a function, so a cycle cannot hide behind a deferred import.
``from package import name`` is an edge to ``package.name`` when that is a module, else
to ``package`` (its ``__init__``). The implicit import of a module's parent packages is
not an edge: a package ``__init__`` that re-exports its modules is not a cycle.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxprune"


def _modules() -> dict[str, pathlib.Path]:
  modules = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    modules[".".join(parts)] = path
  return modules


def _target(name: str, modules: dict[str, pathlib.Path]) -> str | None:
  """The module ``name`` denotes: itself, or the closest enclosing package module."""
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def import_graph() -> dict[str, set[str]]:
  """``{module: the jaxprune modules it imports}``, from every import statement."""
  modules = _modules()
  graph = {}
  for module, path in modules.items():
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parents = package.split(".")[: len(package.split(".")) - node.level + 1]
          base = ".".join([*parents, base] if base else parents)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
      else:
        continue
      edges |= {t for n in names if n.startswith("jaxprune") and (t := _target(n, modules))}
    graph[module] = edges - {module}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan), sorted."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return sorted(found)


def test_cycles_finds_each_strongly_connected_component():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set()}
  assert cycles(graph) == [["a", "b", "c"], ["d", "e"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_level_imports():
  graph = import_graph()
  assert "jaxprune.train.run" in graph["jaxprune.train.loop"]
  assert "jaxprune.train.tfds_source" in graph["jaxprune.train.data"]
  assert "jaxprune.train.evaluate" in graph["jaxprune.cli"]  # imported inside main()


def test_no_import_cycles_in_the_package():
  found = cycles(import_graph())
  assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_submodule_is_shadowed_by_a_name_of_its_package():
  """`jaxprune.surgery.shrink` must be one thing: a package re-exporting a function under
  the name of one of its modules makes `import pkg.mod` and `pkg.mod` disagree."""
  import importlib
  import pkgutil

  import jaxprune

  shadowed = []
  for info in pkgutil.walk_packages(jaxprune.__path__, "jaxprune."):
    parent_name, _, child = info.name.rpartition(".")
    try:
      parent = importlib.import_module(parent_name)
      module = importlib.import_module(info.name)
    except ImportError:  # an extra that is not installed: its own test covers it
      continue
    value = getattr(parent, child, module)
    if value is not module:
      shadowed.append(f"{info.name} (shadowed by {type(value).__name__} {child!r})")
  assert not shadowed, shadowed
