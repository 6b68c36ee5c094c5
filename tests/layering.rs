//! The modules of `src/` form a stack: no module depends, through `crate::` paths, on one that
//! depends on it, and docs/architecture.md draws the stack truthfully. Read from the source
//! text, so it needs no build tooling: a module is `src/X.rs` with the files under `src/X/`,
//! its dependencies the `crate::Y` paths (and `crate::macro!` of an exported macro defined in
//! `Y`) outside comments and outside its tests.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The module's code without its tests and comments.
fn code(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("#[cfg(test)]") {
            break; // the module's tests, by the crate's convention always last
        }
        let trimmed = line.trim_start();
        if trimmed.starts_with("//") {
            continue;
        }
        // A trailing comment: `//` after whitespace (so `redis://` in a string stays).
        let line = match line.find(" //") {
            Some(i) => &line[..i],
            None => line,
        };
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Every `.rs` file of module `name`: `src/name.rs` and those under `src/name/` but tests.
fn files(src: &Path, name: &str) -> Vec<std::path::PathBuf> {
    let mut out = vec![src.join(format!("{name}.rs"))];
    let mut dirs = vec![src.join(name)];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs")
                && p.file_name().is_some_and(|n| n != "tests.rs")
            {
                out.push(p);
            }
        }
    }
    out
}

/// The identifiers that follow `crate::` in `text`, with a trailing `!` for macros.
fn crate_paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        if text[..i].ends_with('$') {
            continue; // `$crate::` inside a macro refers to its own definition site
        }
        let rest = &text[i + "crate::".len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let mut name = rest[..end].to_string();
        if rest[end..].starts_with('!') {
            name.push('!');
        }
        out.push(name);
    }
    out
}

/// Module -> the modules it uses, for the crate in `src`.
fn graph(src: &Path) -> Graph {
    let mut modules = BTreeMap::new();
    for e in fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let Some(stem) = p.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if p.extension().is_some_and(|x| x == "rs") && !matches!(stem, "lib" | "main") {
            let text: String = files(src, stem).iter().map(|f| code(f)).collect();
            modules.insert(stem.to_string(), text);
        }
    }
    // Exported macros live at the crate root but belong to the module that defines them.
    let mut macros = BTreeMap::new();
    for (m, text) in &modules {
        let mut rest = text.as_str();
        while let Some(i) = rest.find("#[macro_export]") {
            rest = &rest[i..];
            if let Some(j) = rest.find("macro_rules!") {
                let name = rest[j + "macro_rules!".len()..]
                    .trim_start()
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .next()
                    .unwrap_or("");
                macros.insert(format!("{name}!"), m.clone());
            }
            rest = &rest[1..];
        }
    }
    let mut g = Graph::new();
    for (m, text) in &modules {
        let deps = g.entry(m.clone()).or_default();
        for p in crate_paths(text) {
            let target = if p.ends_with('!') {
                macros.get(&p).cloned()
            } else {
                modules.contains_key(&p).then_some(p)
            };
            if let Some(t) = target.filter(|t| t != m) {
                deps.insert(t);
            }
        }
    }
    g
}

/// A cycle of `g` as a path `a -> b -> ... -> a`, if it has one.
fn cycle(g: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    fn visit(
        g: &Graph,
        m: &str,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(m.to_string(), Mark::OnPath);
        path.push(m.to_string());
        for d in g.get(m).into_iter().flatten() {
            match marks.get(d).copied().unwrap_or(Mark::New) {
                Mark::OnPath => {
                    let from = path.iter().position(|p| p == d).unwrap();
                    let mut c = path[from..].to_vec();
                    c.push(d.clone());
                    return Some(c);
                }
                Mark::New => {
                    if let Some(c) = visit(g, d, marks, path) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks.insert(m.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for m in g.keys() {
        if marks.get(m).copied().unwrap_or(Mark::New) == Mark::New
            && let Some(c) = visit(g, m, &mut marks, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

fn src() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn the_modules_form_a_stack_without_import_cycles() {
    let g = graph(&src());
    if let Some(c) = cycle(&g) {
        panic!(
            "import cycle between modules of src/: {}\n(the stack is in docs/architecture.md)",
            c.join(" -> ")
        );
    }
}

#[test]
fn the_reader_sees_the_dependencies_that_are_there() {
    let g = graph(&src());
    // A few edges that must always be found, so the reader cannot silently see nothing.
    for (from, to) in [
        ("server", "hub"),
        ("hub", "ids"),
        ("conn", "ws"),
        ("conn", "throttle"),
    ] {
        assert!(
            g[from].contains(to),
            "{from} -> {to} not found: {:?}",
            g[from]
        );
    }
    // And none that are not: the hub is pure, it neither knows the loop nor the settings.
    for to in ["server", "conn", "config", "cluster"] {
        assert!(!g["hub"].contains(to), "hub -> {to}: {:?}", g["hub"]);
    }
}

/// Everything reachable from `m` (not `m` itself unless through a cycle).
fn reachable(g: &Graph, m: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<&String> = g.get(m).into_iter().flatten().collect();
    while let Some(x) = todo.pop() {
        if seen.insert(x.clone()) {
            todo.extend(g.get(x).into_iter().flatten());
        }
    }
    seen
}

/// The arrows (`a --> b`) and nodes of the first Mermaid block of docs/architecture.md.
fn drawn() -> (Graph, BTreeSet<String>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md");
    let text = fs::read_to_string(path).unwrap();
    let block = text
        .split("```mermaid")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("docs/architecture.md has a mermaid block");
    let (mut g, mut nodes) = (Graph::new(), BTreeSet::new());
    for line in block.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            [a, "-->", b] => {
                g.entry(a.into()).or_default().insert(b.into());
                nodes.extend([a.to_string(), b.to_string()]);
            }
            [a] if a.chars().all(|c| c.is_ascii_lowercase() || c == '_') => {
                nodes.insert(a.into());
            }
            _ => {}
        }
    }
    (g, nodes)
}

#[test]
fn docs_architecture_draws_the_real_stack() {
    let real = graph(&src());
    let (doc, nodes) = drawn();
    for m in real.keys() {
        assert!(
            nodes.contains(m),
            "docs/architecture.md does not show module {m}"
        );
    }
    for m in &nodes {
        assert!(
            real.contains_key(m),
            "docs/architecture.md shows {m}, not in src/"
        );
    }
    // Every arrow drawn is a real dependency...
    for (a, bs) in &doc {
        for b in bs {
            assert!(
                real[a].contains(b),
                "docs/architecture.md draws {a} --> {b}, but {a} does not use {b}"
            );
        }
    }
    // ...and the arrows imply every real one (the picture may leave out what follows).
    for (a, bs) in &real {
        let implied = reachable(&doc, a);
        for b in bs {
            assert!(
                implied.contains(b),
                "{a} uses {b}: draw that (e.g. `{a} --> {b}`) in docs/architecture.md"
            );
        }
    }
}

#[test]
fn the_readme_layout_table_lists_every_file_of_src() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = fs::read_to_string(root.join("README.md")).unwrap();
    let mut dirs = vec![root.join("src")];
    while let Some(dir) = dirs.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
                continue;
            }
            let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_string();
            // A row may list a whole folder (`src/web/`), not `src/` itself.
            let parent = rel.rsplit_once('/').unwrap().0;
            let listed_folder = parent != "src" && readme.contains(&format!("`{parent}/`"));
            assert!(
                readme.contains(&format!("`{rel}`")) || listed_folder,
                "README.md's layout table does not list {rel}"
            );
        }
    }
}

#[test]
fn a_cycle_is_found_and_named() {
    let g: Graph = [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")]
        .into_iter()
        .fold(Graph::new(), |mut g, (f, t)| {
            g.entry(f.into()).or_default().insert(t.into());
            g
        });
    assert_eq!(cycle(&g).unwrap().join(" -> "), "a -> b -> c -> a");
    let mut acyclic = g.clone();
    acyclic.get_mut("c").unwrap().clear();
    assert_eq!(cycle(&acyclic), None);
}
