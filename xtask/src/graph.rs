//! The dependency graphs `cargo xtask tidy` checks (issue 16):
//!
//! - the crate graph: the workspace members' normal and build dependencies on each other
//!   (`cargo metadata`; dev-dependencies excluded) must be exactly the edges that
//!   ARCHITECTURE.md's "Crate graph" section declares: an edge in the code but not in the
//!   document fails, and so does a declared edge the code no longer has;
//! - the core rule: the replication core ([`CORE`]) depends only on the pure crates of
//!   [`CORE_PURE_DEPS`] (no tokio, no sockets, no files; its clippy.toml bans the rest);
//! - the server's module graph: `crate::X` references (use statements and paths, outside
//!   comments, strings and `#[cfg(test)]` items) between the top-level modules of
//!   `crates/strata-server/src` must form no cycle: the modules depend one way (issue 16
//!   emptied the list of the cycles once allowed), and every edge on a cycle fails.
//!
//! The parsers are pure functions of text, tested below; [`check`] reads the files.

use crate::json::{self, Json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// A directed edge: from, to.
pub type Edge = (String, String);
/// A graph: each node's successors.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

/// The replication protocol's core, which does no I/O.
pub const CORE: &str = "strata-replica";

/// The crates the core may depend on: pure ones (no I/O, no clock, no runtime). Add one
/// only if that holds for it.
pub const CORE_PURE_DEPS: &[&str] = &["strata-types", "serde", "serde_json", "thiserror"];

/// The heading of ARCHITECTURE.md's section whose fenced block lists the allowed edges.
pub const CRATE_GRAPH_HEADING: &str = "## Crate graph";

/// Runs every graph check from the workspace `root`; returns the problems found (empty
/// when all pass). Prints the module cycles it finds.
pub fn check(root: &Path) -> Result<Vec<String>, String> {
    let mut problems = Vec::new();

    let out = std::process::Command::new("cargo")
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(root)
        .output()
        .map_err(|e| format!("cannot run cargo metadata: {e}"))?;
    if !out.status.success() {
        return Err(format!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let text = String::from_utf8(out.stdout).map_err(|_| "cargo metadata: not UTF-8")?;
    let metadata = json::parse(&text)?;
    let code = crate_edges(&metadata)?;
    let doc_path = root.join("ARCHITECTURE.md");
    let doc =
        std::fs::read_to_string(&doc_path).map_err(|e| format!("{}: {e}", doc_path.display()))?;
    let declared = declared_edges(&doc)?;
    problems.extend(compare_crate_edges(&code, &declared));
    problems.extend(core_problems(&package_deps(&metadata, CORE)?));

    let src = root.join("crates/strata-server/src");
    let mut files = Vec::new();
    crate::collect_rs(&src, &mut files);
    files.sort();
    let mut sources = Vec::new();
    for file in files {
        let text =
            std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let rel = file.strip_prefix(&src).map_err(|_| format!("{}: not in src", file.display()))?;
        let rel: Vec<String> =
            rel.iter().map(|c| c.to_string_lossy().trim_end_matches(".rs").to_owned()).collect();
        sources.push((rel, text));
    }
    let graph = module_graph(&sources);
    let (cycle_problems, cycles) = check_cycles(&graph);
    for cycle in &cycles {
        eprintln!("   strata-server module cycle: {}", cycle.join(", "));
    }
    problems.extend(cycle_problems);
    Ok(problems)
}

/// The workspace members and their normal and build dependencies on each other, from
/// `cargo metadata --format-version 1` (with or without `--no-deps`).
pub fn crate_edges(metadata: &Json) -> Result<BTreeSet<Edge>, String> {
    let members = members(metadata)?;
    let names: BTreeSet<&str> = members.iter().map(|(name, _)| *name).collect();
    let mut edges = BTreeSet::new();
    for (name, package) in &members {
        for dep in runtime_deps(package)? {
            if names.contains(dep.as_str()) {
                edges.insert((name.to_string(), dep));
            }
        }
    }
    Ok(edges)
}

/// The normal and build dependencies (all of them, by package name) of the workspace
/// member `name`.
pub fn package_deps(metadata: &Json, name: &str) -> Result<Vec<String>, String> {
    let members = members(metadata)?;
    let (_, package) = members
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| format!("cargo metadata: no workspace member {name}"))?;
    runtime_deps(package)
}

/// The workspace members' packages, by name.
fn members(metadata: &Json) -> Result<Vec<(&str, &Json)>, String> {
    let ids: BTreeSet<&str> = metadata
        .get("workspace_members")
        .and_then(Json::as_array)
        .ok_or("cargo metadata: no workspace_members")?
        .iter()
        .filter_map(Json::as_str)
        .collect();
    let packages =
        metadata.get("packages").and_then(Json::as_array).ok_or("cargo metadata: no packages")?;
    let mut out = Vec::new();
    for p in packages {
        let id = p.get("id").and_then(Json::as_str).ok_or("cargo metadata: a package lacks id")?;
        if ids.contains(id) {
            let name = p.get("name").and_then(Json::as_str).ok_or("a package lacks a name")?;
            out.push((name, p));
        }
    }
    Ok(out)
}

/// A package's normal (`kind` null) and build dependencies, by package name (a renamed
/// dependency under its real name).
fn runtime_deps(package: &Json) -> Result<Vec<String>, String> {
    let deps = package
        .get("dependencies")
        .and_then(Json::as_array)
        .ok_or("cargo metadata: a package lacks dependencies")?;
    let mut out = Vec::new();
    for d in deps {
        let kind = d.get("kind").and_then(Json::as_str);
        if matches!(kind, None | Some("build")) {
            let name = d.get("name").and_then(Json::as_str).ok_or("a dependency lacks a name")?;
            out.push(name.to_owned());
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The edges declared in `doc`'s [`CRATE_GRAPH_HEADING`] section: the first fenced block
/// after the heading, one `from -> to` a line (blank lines and `#` comments ignored).
pub fn declared_edges(doc: &str) -> Result<BTreeSet<Edge>, String> {
    let mut lines = doc.lines().enumerate();
    lines
        .by_ref()
        .find(|(_, l)| l.trim_end() == CRATE_GRAPH_HEADING)
        .ok_or(format!("ARCHITECTURE.md lacks a {CRATE_GRAPH_HEADING:?} section"))?;
    for (_, line) in lines.by_ref() {
        if line.starts_with("```") {
            break;
        }
        if line.starts_with("## ") {
            return Err(format!("{CRATE_GRAPH_HEADING:?} has no fenced block of edges"));
        }
    }
    let mut edges = BTreeSet::new();
    for (i, line) in lines {
        let line = line.trim();
        if line.starts_with("```") {
            return Ok(edges);
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parsed = line.split_once("->").and_then(|(from, to)| {
            let (from, to) = (from.trim(), to.trim());
            let name = |s: &str| {
                !s.is_empty()
                    && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            };
            (name(from) && name(to)).then(|| (from.to_owned(), to.to_owned()))
        });
        match parsed {
            Some(edge) => {
                edges.insert(edge);
            }
            None => {
                return Err(format!(
                    "ARCHITECTURE.md:{}: not a `crate -> crate` edge: {line:?}",
                    i + 1
                ))
            }
        }
    }
    Err(format!("{CRATE_GRAPH_HEADING:?}: the fenced block is not closed"))
}

/// The differences between the code's crate edges and the declared ones, as problems.
pub fn compare_crate_edges(code: &BTreeSet<Edge>, declared: &BTreeSet<Edge>) -> Vec<String> {
    let mut problems = Vec::new();
    for (from, to) in code.difference(declared) {
        problems.push(format!(
            "crate graph: {from} depends on {to}, which ARCHITECTURE.md's {CRATE_GRAPH_HEADING:?} \
             does not allow (declare `{from} -> {to}` there if it should)"
        ));
    }
    for (from, to) in declared.difference(code) {
        problems.push(format!(
            "crate graph: ARCHITECTURE.md declares `{from} -> {to}`, which the code no longer \
             has (remove it from the document)"
        ));
    }
    problems
}

/// The core's dependencies that are not known to be pure.
pub fn core_problems(core_deps: &[String]) -> Vec<String> {
    core_deps
        .iter()
        .filter(|d| !CORE_PURE_DEPS.contains(&d.as_str()))
        .map(|d| {
            format!(
                "crate graph: {CORE} (the sans-I/O core) depends on {d}, not one of the pure \
                 crates it may use ({})",
                CORE_PURE_DEPS.join(", ")
            )
        })
        .collect()
}

/// Rust source with comments, string and char literals blanked (replaced by spaces, line
/// breaks kept), so that what remains is code.
pub fn strip_comments_and_strings(src: &str) -> String {
    let b: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let blank = |out: &mut String, c: char| out.push(if c == '\n' { '\n' } else { ' ' });
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            // Block comments nest in Rust.
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && !b[..i].last().is_some_and(|p| p.is_alphanumeric() || *p == '_')
        {
            // A raw string: r"…" or r#"…"#.
            let mut j = i + 1;
            while b.get(j) == Some(&'#') {
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let hashes = j - i - 1;
            j += 1;
            while j < b.len() {
                if b[j] == '"' && (1..=hashes).all(|k| b.get(j + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            for &ch in &b[i..j.min(b.len())] {
                blank(&mut out, ch);
            }
            i = j;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < b.len() && b[i] != '"' {
                let skip = if b[i] == '\\' { 2 } else { 1 };
                for &ch in &b[i..(i + skip).min(b.len())] {
                    blank(&mut out, ch);
                }
                i += skip;
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{1F}'), or a lifetime or label ('a), kept.
            let end = if next == Some('\\') {
                (i + 2..b.len().min(i + 12)).find(|&j| b[j] == '\'')
            } else {
                (b.get(i + 2) == Some(&'\'')).then_some(i + 2)
            };
            match end {
                Some(end) => {
                    for &ch in &b[i..=end] {
                        blank(&mut out, ch);
                    }
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Code (comments and strings stripped) without its `#[cfg(test)]` items, and the names of
/// the `#[cfg(test)] mod NAME;` files it declares.
fn without_test_items(code: &str) -> (String, Vec<String>) {
    const ATTR: &str = "#[cfg(test)]";
    let mut out = String::with_capacity(code.len());
    let mut test_files = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find(ATTR) {
        out.push_str(&rest[..at]);
        let item = &rest[at + ATTR.len()..];
        // The item ends at its first `;` outside braces, or at the brace that closes its
        // first block.
        let mut depth = 0usize;
        let mut end = item.len();
        for (j, ch) in item.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        end = j + 1;
                        break;
                    }
                }
                ';' if depth == 0 => {
                    end = j + 1;
                    break;
                }
                _ => {}
            }
        }
        let words: Vec<&str> =
            item[..end].split(|c: char| !(c.is_alphanumeric() || c == '_')).collect();
        let words: Vec<&str> = words.into_iter().filter(|w| !w.is_empty()).collect();
        if item[..end].ends_with(';') {
            if let Some(k) = words.iter().position(|w| *w == "mod") {
                test_files.extend(words.get(k + 1).map(|w| w.to_string()));
            }
        }
        for ch in item[..end].chars() {
            out.push(if ch == '\n' { '\n' } else { ' ' });
        }
        rest = &item[end..];
    }
    out.push_str(rest);
    (out, test_files)
}

/// The first path segment of every `crate::` reference in `code` (comments, strings
/// already stripped): `use crate::a::B`, `crate::b::f()`, `use crate::{c, d::E}`.
pub fn crate_refs(code: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    let b: Vec<char> = code.chars().collect();
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut i = 0;
    while i + 5 <= b.len() {
        let is_word = b[i..i + 5].iter().collect::<String>() == "crate"
            && !b[..i].last().is_some_and(|&p| ident(p) || p == '$' || p == ':')
            && !b.get(i + 5).is_some_and(|&n| ident(n));
        if !is_word {
            i += 1;
            continue;
        }
        let mut j = i + 5;
        let skip_ws = |j: &mut usize| {
            while b.get(*j).is_some_and(|c| c.is_whitespace()) {
                *j += 1;
            }
        };
        skip_ws(&mut j);
        if b.get(j) != Some(&':') || b.get(j + 1) != Some(&':') {
            i += 5;
            continue;
        }
        j += 2;
        skip_ws(&mut j);
        if b.get(j) == Some(&'{') {
            // A group: the first segment of each top-level item.
            let mut depth = 0;
            let mut expect_item = true;
            while let Some(&c) = b.get(j) {
                match c {
                    '{' => {
                        depth += 1;
                        if depth == 1 {
                            expect_item = true;
                        }
                    }
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => expect_item = true,
                    c if depth == 1 && expect_item && ident(c) => {
                        let start = j;
                        while b.get(j).is_some_and(|&c| ident(c)) {
                            j += 1;
                        }
                        refs.insert(b[start..j].iter().collect());
                        expect_item = false;
                        continue;
                    }
                    _ => {}
                }
                j += 1;
            }
        } else {
            let start = j;
            while b.get(j).is_some_and(|&c| ident(c)) {
                j += 1;
            }
            if j > start {
                refs.insert(b[start..j].iter().collect());
            }
        }
        i = j.max(i + 5);
    }
    refs.remove("self");
    refs
}

/// The module graph of a crate's sources, each given as its path under `src/` (segments,
/// `.rs` dropped) and its text. A file belongs to its top-level module (`a.rs`,
/// `a/b.rs`, `a/mod.rs`: `a`); the crate roots (`main`, `lib`) are the node `main`, and a
/// `crate::X` whose `X` is no module is an item of the root. Test-only code (`#[cfg(test)]`
/// items and the files they declare) is left out, like dev-dependencies.
pub fn module_graph(sources: &[(Vec<String>, String)]) -> Graph {
    let module_of = |path: &[String]| -> String {
        match path.first().map(String::as_str) {
            Some("main") | Some("lib") | None => "main".to_owned(),
            Some(m) => m.to_owned(),
        }
    };
    let modules: BTreeSet<String> = sources.iter().map(|(p, _)| module_of(p)).collect();
    let mut stripped = Vec::new();
    let mut test_files: BTreeSet<Vec<String>> = BTreeSet::new();
    for (path, text) in sources {
        let (code, tests) = without_test_items(&strip_comments_and_strings(text));
        // `mod t;` in a.rs or a/mod.rs is a/t.rs (or a/t/mod.rs); in main.rs, t.rs.
        let dir: &[String] = match path.last().map(String::as_str) {
            Some("mod") => &path[..path.len() - 1],
            Some("main") | Some("lib") if path.len() == 1 => &[],
            _ => path,
        };
        for t in tests {
            let mut file = dir.to_vec();
            file.push(t);
            test_files.insert(file);
        }
        stripped.push((path, code));
    }
    let mut graph = Graph::new();
    for m in &modules {
        graph.entry(m.clone()).or_default();
    }
    for (path, code) in stripped {
        if test_files.iter().any(|t| path.starts_with(t)) {
            continue;
        }
        let from = module_of(path);
        for r in crate_refs(&code) {
            let to = if modules.contains(&r) { r } else { "main".to_owned() };
            if to != from {
                graph.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    graph
}

/// The strongly connected components of `graph` with more than one node (its cycles,
/// each sorted), in order.
pub fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    // Tarjan's algorithm; the graphs are small, recursion is fine.
    struct State<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    let nodes: BTreeSet<&str> = graph
        .iter()
        .flat_map(|(k, vs)| std::iter::once(k.as_str()).chain(vs.iter().map(String::as_str)))
        .collect();
    for v in nodes {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out.sort();
    s.out
}

/// A shortest path from `from` to `to` in `graph`, both ends included.
fn path(graph: &Graph, from: &str, to: &str) -> Option<Vec<String>> {
    let mut came: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([from]);
    while let Some(v) = queue.pop_front() {
        if v == to {
            let mut p = vec![to.to_owned()];
            let mut at = to;
            while at != from {
                at = came[at];
                p.push(at.to_owned());
            }
            p.reverse();
            return Some(p);
        }
        for w in graph.get(v).into_iter().flatten() {
            if w != from && !came.contains_key(w.as_str()) {
                came.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    None
}

/// Checks that `graph` has no cycle: every edge inside one is a problem (shown with the
/// way back that closes it). Returns the problems and the cycles found.
pub fn check_cycles(graph: &Graph) -> (Vec<String>, Vec<Vec<String>>) {
    let found = cycles(graph);
    let mut problems = Vec::new();
    for component in &found {
        for from in component {
            for to in graph.get(from).into_iter().flatten().filter(|to| component.contains(to)) {
                let back = path(graph, to, from).map(|p| p.join(" -> ")).unwrap_or_default();
                let used = if to == "main" {
                    "the crate root's items".to_owned()
                } else {
                    format!("crate::{to}")
                };
                problems.push(format!(
                    "module graph: a cycle in strata-server: {from} -> {back} ({used} used in \
                     {from}; make the modules depend one way)"
                ));
            }
        }
    }
    (problems, found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(path: &str, text: &str) -> (Vec<String>, String) {
        (path.split('/').map(str::to_owned).collect(), text.to_owned())
    }

    fn edges(list: &[(&str, &str)]) -> BTreeSet<Edge> {
        list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn crate_references_are_found_in_code_only() {
        let code = strip_comments_and_strings(
            r##"
use crate::node::{A, B};
use crate::{api, metrics::Counted, guard::{x, y}};
// crate::commented
/* crate::block /* nested */ crate::still */
let s = "crate::in_string \" crate::escaped";
let r = r#"crate::raw"#;
let c = '"'; let t = crate::tls::provider(); let l: &'static str = "";
macro_rules! m { () => { $crate::macro_path } }
pub(crate) fn f() -> crate ::  spaced::T { strata_crate::no }
use crate::self_test::{self};
"##,
        );
        let refs: Vec<String> = crate_refs(&code).into_iter().collect();
        assert_eq!(refs, ["api", "guard", "metrics", "node", "self_test", "spaced", "tls"]);
    }

    #[test]
    fn a_small_graph_with_a_cycle_is_found_and_test_code_is_not_counted() {
        let sources = [
            src("main", "mod a; mod b; mod c; fn main() { crate::a::run(); }"),
            src("a", "use crate::b::B;\n#[cfg(test)]\nmod tests { use crate::d::D; }"),
            src("b", "pub fn f() { crate::c::g() }"),
            src("c", "use crate::{a::A, main_item};\n#[cfg(test)]\nuse crate::d;"),
            src("d", "#[cfg(test)]\nmod t;\npub struct D;"),
            src("d/t", "use crate::a::A;"),
        ];
        let graph = module_graph(&sources);
        assert_eq!(graph["a"], ["b".to_owned()].into());
        assert_eq!(graph["c"], ["a".to_owned(), "main".to_owned()].into());
        assert!(graph["d"].is_empty(), "a test-only file adds no edge: {graph:?}");
        assert_eq!(cycles(&graph), [["a", "b", "c", "main"]]);

        let (problems, _) = check_cycles(&graph);
        assert_eq!(problems.len(), 5, "every edge on the cycle fails: {problems:?}");
        assert!(problems[0].contains("a -> b -> c -> a"), "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("(the crate root's items used in c;")));
    }

    #[test]
    fn a_graph_that_depends_one_way_passes_and_every_cycle_fails() {
        let mut graph = Graph::new();
        graph.entry("x".into()).or_default().insert("y".into());
        graph.entry("y".into()).or_default().insert("z".into());
        graph.entry("x".into()).or_default().insert("z".into());
        let (problems, found) = check_cycles(&graph);
        assert!(problems.is_empty() && found.is_empty(), "{problems:?}");
        // Two cycles at once: x, y and z, w.
        graph.entry("y".into()).or_default().insert("x".into());
        graph.entry("z".into()).or_default().insert("w".into());
        graph.entry("w".into()).or_default().insert("z".into());
        let (problems, found) = check_cycles(&graph);
        assert_eq!(found, [["w", "z"], ["x", "y"]]);
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("y -> x -> y")), "{problems:?}");
        assert!(!problems.iter().any(|p| p.contains("x -> z")), "not on a cycle: {problems:?}");
    }

    const DOC: &str = "# A\n\n## Crate graph\n\nText.\n\n```text\n# comment\nb -> a\n\nc -> a\n\
                       c->b\n```\n\n## Next\n";

    #[test]
    fn declared_edges_are_parsed_and_compared_both_ways() {
        let declared = declared_edges(DOC).expect("parses");
        assert_eq!(declared, edges(&[("b", "a"), ("c", "a"), ("c", "b")]));
        assert!(compare_crate_edges(&declared, &declared).is_empty());

        let code = edges(&[("b", "a"), ("c", "a"), ("c", "b"), ("a", "d")]);
        let problems = compare_crate_edges(&code, &declared);
        assert_eq!(problems.len(), 1, "an undeclared edge fails");
        assert!(problems[0].contains("a depends on d"), "{problems:?}");

        let code = edges(&[("b", "a"), ("c", "a")]);
        let problems = compare_crate_edges(&code, &declared);
        assert_eq!(problems.len(), 1, "a declared edge the code lacks fails");
        assert!(problems[0].contains("`c -> b`"), "{problems:?}");

        assert!(declared_edges("# A\n").is_err(), "no section");
        assert!(declared_edges("## Crate graph\n```\na => b\n```\n").is_err(), "bad line");
        assert!(declared_edges("## Crate graph\n```\na -> b\n").is_err(), "open block");
        assert!(declared_edges("## Crate graph\n\n## Other\n```\na -> b\n```").is_err());
    }

    #[test]
    fn the_edges_come_from_cargo_metadata_without_dev_deps() {
        let metadata = json::parse(
            r#"{"workspace_members": ["id-a", "id-b", "id-core"],
                "packages": [
                  {"id": "id-a", "name": "a", "dependencies": [
                    {"name": "b", "kind": null}, {"name": "core", "kind": "dev"},
                    {"name": "serde", "kind": null}]},
                  {"id": "id-b", "name": "b", "dependencies": [
                    {"name": "core", "kind": "build"}, {"name": "core", "kind": null}]},
                  {"id": "id-core", "name": "core", "dependencies": [
                    {"name": "thiserror", "kind": null}, {"name": "tokio", "kind": null},
                    {"name": "tempfile", "kind": "dev"}]},
                  {"id": "id-outside", "name": "outside", "dependencies": [
                    {"name": "a", "kind": null}]}
                ]}"#,
        )
        .expect("valid");
        let found = crate_edges(&metadata).expect("edges");
        assert_eq!(found, edges(&[("a", "b"), ("b", "core")]));
        let core = package_deps(&metadata, "core").expect("deps");
        assert_eq!(core, ["thiserror", "tokio"]);
        let problems = core_problems(&core);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("depends on tokio"), "{problems:?}");
        assert!(package_deps(&metadata, "outside").is_err(), "not a member");
    }
}
