#!/usr/bin/env python3
"""Finds cycles between the modules of each crate in the workspace.

Checked at every level: sibling modules `a` and `b` (children of the crate root or of one
module) must not name each other both ways, directly or through further siblings. Code
anywhere under `a` that names `crate::b`, `super::b`, ... counts for `a`. A module may use
its parent's and its children's items. Test code is left out: files
named `tests.rs` or `*_tests.rs`, and everything after a `#[cfg(test)]` line, since tests may
reach across the layers they check. Prints each cycle and exits 1 when there is one.

Cycles still being untangled are listed in scripts/module_cycles.known, one per line as
`<src dir>: <module>, <module>, ...`; they are reported but pass. A listed cycle that is gone
fails too, so the list only shrinks.

Usage: scripts/module_cycles.py [CRATE_SRC_DIR ...]   (default: every src/ of the workspace)
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PATH_RE = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)*)(::\{[^{}]*\})?")


def product_text(path):
    text = path.read_text()
    cut = text.find("#[cfg(test)]")
    text = text if cut < 0 else text[:cut]
    # Comments and doc comments name modules without depending on them.
    return re.sub(r"//[^\n]*", "", text)


def module_of(src, path):
    """The module path of a source file: `a/b.rs` and `a/b/mod.rs` are ("a", "b")."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts.pop()
    return tuple(parts)


USE_RE = re.compile(r"\bpub(?:\([a-z]+\))?\s+use\s+([^;]+);")


def use_items(tree):
    """(path segments, visible name) of each item in a use tree such as `a::{b, c::D as E}`."""
    tree = re.sub(r"\s+", " ", tree).strip()
    if "{" not in tree:
        parts, _, alias = tree.partition(" as ")
        segments = [seg.strip() for seg in parts.split("::") if seg.strip()]
        yield segments, (alias.strip() or segments[-1])
        return
    prefix, _, inner = tree.partition("{")
    inner = inner[: inner.rindex("}")]
    depth, item, items = 0, "", []
    for ch in inner:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            items.append(item)
            item = ""
        else:
            item += ch
    items.append(item)
    head = [seg.strip() for seg in prefix.split("::") if seg.strip()]
    for it in filter(str.strip, items):
        for segments, name in use_items(it):
            yield head + segments, name


def reexports_of(files, src, known):
    """`pub use` items: the module path under which a name is visible -> the module path
    of what it names, so `crate::Name` counts as a use of the module that defines it."""
    found = {}
    for path in files:
        module = module_of(src, path)
        for tree in USE_RE.findall(product_text(path)):
            for segments, name in use_items(tree):
                base = module
                if segments and segments[0] == "crate":
                    base, segments = (), segments[1:]
                elif segments and segments[0] == "self":
                    segments = segments[1:]
                while segments and segments[0] == "super":
                    base, segments = base[:-1], segments[1:]
                target = base + tuple(segments)
                while target and target not in known:
                    target = target[:-1]
                if target:
                    found[module + (name,)] = target
    return found


def resolve(path, known, reexports):
    """The deepest module `path` names, following `pub use` re-exports."""
    for _ in range(8):
        for cut in range(len(path), 0, -1):
            prefix = path[:cut]
            if prefix in reexports and prefix not in known:
                path = reexports[prefix] + path[cut:]
                break
        else:
            break
    while path and path not in known:
        path = path[:-1]
    return path


def references(module, text, known, reexports):
    """The modules `text` (code of `module`) names, as absolute module paths."""
    for kind, rest, group in PATH_RE.findall(text):
        segments = [seg for seg in rest.split("::") if seg]
        base = {"crate": (), "self": module, "super": module[:-1]}[kind]
        while segments and segments[0] == "super":
            base, segments = base[:-1], segments[1:]
        tails = [segments]
        if group:
            tails = [segments + items for items, _ in use_items(group[2:])]
        for tail in tails:
            path = resolve(base + tuple(tail), known, reexports)
            if path:
                yield path


def graph_of(src):
    """Edges between sibling modules: `a` -> `b` when code anywhere in `a` names something in
    `b` and neither contains the other (a module may use its parent's and its children's
    items; siblings must not depend on each other both ways)."""
    files = [p for p in src.rglob("*.rs") if "bin" not in p.relative_to(src).parts[:1]]
    known = {module_of(src, p) for p in files}
    known |= {m[:i] for m in known for i in range(1, len(m))}
    reexports = reexports_of(files, src, known)
    edges = {}
    for path in files:
        module = module_of(src, path)
        if not module or path.name == "tests.rs" or path.name.endswith("_tests.rs"):
            continue
        for target in references(module, product_text(path), known, reexports):
            common = 0
            while common < min(len(module), len(target)) and module[common] == target[common]:
                common += 1
            if common == len(module) or common == len(target):
                continue
            a, b = module[: common + 1], target[: common + 1]
            edges.setdefault(a, set()).add(b)
            edges.setdefault(b, set())
    return edges


def cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def self_test():
    """The check finds what it must: a two-way use through a re-export, one level down."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp)
        (src / "outer").mkdir()
        (src / "lib.rs").write_text("mod outer;\npub use outer::b::Thing;\n")
        (src / "outer" / "mod.rs").write_text("mod a;\nmod b;\n")
        (src / "outer" / "a.rs").write_text("use super::b::Thing;\n")
        (src / "outer" / "b.rs").write_text("pub struct Thing;\nfn f() { crate::outer::a::g() }\n"
                                            "#[cfg(test)]\nmod tests { use crate::x; }\n")
        found = cycles(graph_of(src))
        assert found == [[("outer", "a"), ("outer", "b")]], found
        (src / "outer" / "b.rs").write_text("pub struct Thing;\n")
        assert cycles(graph_of(src)) == [], "a one-way use is no cycle"
        (src / "c.rs").write_text("use crate::Thing;\n")
        (src / "outer" / "b.rs").write_text("pub struct Thing;\nuse crate::c;\n")
        (src / "lib.rs").write_text("mod outer;\nmod c;\npub use outer::b::Thing;\n")
        found = cycles(graph_of(src))
        assert found == [[("c",), ("outer",)]], found
    print("module_cycles self-test passed")


def main():
    if sys.argv[1:] == ["--self-test"]:
        self_test()
        return
    srcs = [pathlib.Path(a) for a in sys.argv[1:]] or sorted(
        p.parent for p in ROOT.glob("**/Cargo.toml")
        if (p.parent / "src").is_dir() and "target" not in p.parts
    )
    srcs = [s / "src" if (s / "src").is_dir() else s for s in srcs]
    # A binary with modules of its own (src/bin/<name>/main.rs) is a crate root too.
    srcs += sorted(main.parent for src in srcs for main in src.glob("bin/*/main.rs"))
    known_file = ROOT / "scripts" / "module_cycles.known"
    known = {line.strip() for line in known_file.read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    seen, bad = set(), 0
    name = "::".join
    for src in srcs:
        edges = graph_of(src)
        where = src.relative_to(ROOT) if src.is_absolute() else src
        for component in cycles(edges):
            key = f"{where}: {', '.join(map(name, component))}"
            seen.add(key)
            links = [f"{name(a)} -> {name(b)}" for a in component for b in sorted(edges[a])
                     if b in component]
            status = "known" if key in known else "NEW"
            bad += key not in known
            print(f"{status} cycle in {where}: {', '.join(map(name, component))} "
                  f"({'; '.join(links)})")
    checked = {str(s.relative_to(ROOT) if s.is_absolute() else s) for s in srcs}
    for key in sorted(known - seen):
        if key.split(":")[0] in checked:
            bad += 1
            print(f"listed in {known_file.name} but gone (remove the line): {key}")
    if bad:
        sys.exit(1)
    print(f"module cycles: {len(srcs)} crates, no new cycle, {len(seen)} known")


if __name__ == "__main__":
    main()
