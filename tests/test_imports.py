"""The project's modules import each other without circles: no module reaches itself through its
imports, type hints included (``typing.TYPE_CHECKING`` blocks count: a circle there is still two
rooms that each need the other). The one exception is a package's own ``__init__`` named in a
submodule's type hints (``sim.tasks.TaskConfig``): the package and its modules are one room. The
layers between rooms are import-linter's contracts (pyproject.toml, ``make test``)."""

import grimp

PACKAGES = ("megacontext", "lensnet", "gistnet", "analysis", "sim", "envs")


def _graph():
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    for module in list(graph.modules):  # a submodule's hint of its own package: one room
        for imported in graph.find_modules_directly_imported_by(module):
            if module.startswith(imported + ".") and all(
                d["line_contents"].startswith(("from", "import")) and _type_only(module, imported)
                for d in graph.get_import_details(importer=module, imported=imported)
            ):
                graph.remove_import(importer=module, imported=imported)
    return graph


def _type_only(module: str, imported: str) -> bool:
    """Every import of ``imported`` by ``module`` sits inside an ``if TYPE_CHECKING:`` block."""
    typed = grimp.build_graph(module.split(".")[0], cache_dir=None,
                              exclude_type_checking_imports=True)
    return not typed.direct_import_exists(importer=module, imported=imported)


def circles(graph) -> list[tuple[str, ...]]:
    """Each strongly connected set of two or more modules (Tarjan's algorithm)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.find_modules_directly_imported_by(v)):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(tuple(sorted(comp)))

    for v in sorted(graph.modules):
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_itself_through_others():
    assert circles(_graph()) == []


def test_the_check_finds_a_circle():
    graph = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        graph.add_import(importer=a, imported=b)
    assert circles(graph) == [("p.a", "p.b", "p.c")]
