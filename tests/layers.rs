//! The layer rule of ARCHITECTURE.md, checked on the source: every `crate::` (and, in
//! `main.rs`, `smgate::`) path in `src/**/*.rs` must point to the same or a lower layer, the
//! modules must not form a cycle, and the modules that wire the gateway together are imported
//! by `main.rs` alone. The checker is a small lexer over the files, so a `use` inside a function
//! or a path written in full counts as much as a `use` at the top; comments and strings do not.
//!
//! The same module also holds the length rule: no function outside tests is over 120 lines.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module belongs to the longest entry that prefixes its path, so
/// `ledger::log` (the log's storage) sits above the pure `ledger`. A module may use its own
/// layer and the layers below; within a layer the graph must stay acyclic.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "pure cores and leaves",
        &[
            "alloc", "chart", "clock", "json", "ledger", "signals", "systemd", "tls",
        ],
    ),
    ("store", &["store", "ledger::log", "metrics"]),
    (
        "domain",
        &[
            "agents",
            "auth",
            "gateway",
            "instances",
            "machines",
            "pages",
        ],
    ),
    ("adapters", &["config", "http", "hub", "mqtt", "sync"]),
    ("wiring", &["server"]),
    ("command line", &["main", "cli"]),
];

/// Modules that only the command line (`main.rs` and the subcommands it dispatches to in
/// `cli/`) may import: the wiring, and the hub (a separate program in the same binary).
const ONLY_FROM_MAIN: &[&str] = &["cli", "hub", "server"];
const COMMAND_LINE: usize = LAYERS.len() - 1;

/// A dependency of one module on another, with the file that makes it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Edge {
    from: String,
    to: String,
    file: String,
}

/// The module a file defines: `src/ledger/log/read.rs` is `ledger::log::read`; `main.rs` is
/// `main`; `lib.rs` is the crate root (``).
fn module_of(rel: &Path) -> String {
    let s = rel.to_string_lossy().replace('\\', "/");
    let s = s.trim_end_matches(".rs");
    let s = s.strip_suffix("/mod").unwrap_or(s);
    match s {
        "lib" => String::new(),
        other => other.replace('/', "::"),
    }
}

/// The layer entry a module path belongs to (longest prefix match), with the layer's index.
fn unit_of(path: &str) -> Option<(usize, &'static str)> {
    let mut best: Option<(usize, &'static str)> = None;
    for (i, (_, members)) in LAYERS.iter().enumerate() {
        for m in members.iter() {
            let hit = path == *m || path.starts_with(&format!("{m}::"));
            if hit && best.is_none_or(|(_, b)| m.len() > b.len()) {
                best = Some((i, m));
            }
        }
    }
    best
}

/// The source with comments, string literals and char literals blanked out.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b[i] == b'r'
            && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#'))
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
        {
            // Raw string: r"…" or r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            j += 1;
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            while j < b.len() && !b[j..].starts_with(&close) {
                j += 1;
            }
            i = j + close.len();
            out.push_str("\"\"");
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            out.push_str("' '");
            i += 3;
        } else if b[i] == b'\'' && b.get(i + 1) == Some(&b'\\') {
            // '\n', '\'', '\u{..}'
            let mut j = i + 2;
            j += 1;
            while j < b.len() && b[j] != b'\'' {
                j += 1;
            }
            out.push_str("' '");
            i = j + 1;
        } else {
            // Keep newlines so that line numbers stay meaningful.
            let ch = src[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// Expands the use tree that starts at `s` (just after `crate::`) into full paths.
fn use_tree(s: &str) -> Vec<String> {
    fn parse(s: &[u8], i: &mut usize, prefix: &str, out: &mut Vec<String>) {
        let mut path = prefix.to_string();
        loop {
            while *i < s.len() && s[*i].is_ascii_whitespace() {
                *i += 1;
            }
            if s.get(*i) == Some(&b'{') {
                *i += 1;
                loop {
                    parse(s, i, &path, out);
                    while *i < s.len() && s[*i].is_ascii_whitespace() {
                        *i += 1;
                    }
                    match s.get(*i) {
                        Some(b',') => *i += 1,
                        Some(b'}') => {
                            *i += 1;
                            return;
                        }
                        _ => return,
                    }
                    while *i < s.len() && s[*i].is_ascii_whitespace() {
                        *i += 1;
                    }
                    if s.get(*i) == Some(&b'}') {
                        *i += 1;
                        return;
                    }
                }
            }
            let start = *i;
            while *i < s.len() && (s[*i].is_ascii_alphanumeric() || s[*i] == b'_' || s[*i] == b'*')
            {
                *i += 1;
            }
            let seg = std::str::from_utf8(&s[start..*i]).unwrap_or("");
            if seg.is_empty() || seg == "self" || seg == "*" {
                if !path.is_empty() {
                    out.push(path);
                }
                return;
            }
            if !path.is_empty() {
                path.push_str("::");
            }
            path.push_str(seg);
            if s[*i..].starts_with(b"::") {
                *i += 2;
            } else {
                out.push(path);
                return;
            }
        }
    }
    let mut out = Vec::new();
    let mut i = 0;
    parse(s.as_bytes(), &mut i, "", &mut out);
    out
}

/// Every module-level dependency the file at `rel` (relative to `src/`) declares.
fn edges_of(rel: &Path, src: &str) -> Vec<Edge> {
    let module = module_of(rel);
    if module.is_empty() {
        return Vec::new();
    }
    let Some((_, from)) = unit_of(&module) else {
        panic!(
            "{}: module `{module}` has no layer in LAYERS; add it (and to ARCHITECTURE.md)",
            rel.display()
        );
    };
    let root = if module == "main" {
        "smgate::"
    } else {
        "crate::"
    };
    let code = code_only(src);
    let mut out = BTreeSet::new();
    let mut at = 0;
    while let Some(k) = code[at..].find(root) {
        let p = at + k;
        at = p + root.len();
        let before = code[..p].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        for path in use_tree(&code[at..]) {
            let Some((_, to)) = unit_of(&path) else {
                continue; // a crate-root item such as a macro
            };
            if to != from {
                out.insert(Edge {
                    from: from.to_string(),
                    to: to.to_string(),
                    file: rel.display().to_string(),
                });
            }
        }
    }
    out.into_iter().collect()
}

/// The rule's verdicts on a set of edges: one line per broken edge or cycle.
fn violations(edges: &[Edge]) -> Vec<String> {
    let layer = |u: &str| unit_of(u).map(|(i, _)| i).unwrap_or(usize::MAX);
    let mut out = Vec::new();
    for e in edges {
        let (lf, lt) = (layer(&e.from), layer(&e.to));
        if lt > lf {
            out.push(format!(
                "{}: `{}` ({}) imports `{}` ({}), a higher layer",
                e.file, e.from, LAYERS[lf].0, e.to, LAYERS[lt].0
            ));
        }
        if ONLY_FROM_MAIN.contains(&e.to.as_str()) && lf != COMMAND_LINE {
            out.push(format!(
                "{}: `{}` imports `{}`, which only the command line (main.rs, cli/) may import",
                e.file, e.from, e.to
            ));
        }
    }
    // Cycles between modules: strongly connected components of more than one module.
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for e in edges {
        graph.entry(&e.from).or_default().insert(&e.to);
        graph.entry(&e.to).or_default();
    }
    for component in strongly_connected(&graph) {
        if component.len() > 1 {
            let files: BTreeSet<&str> = edges
                .iter()
                .filter(|e| {
                    component.contains(&e.from.as_str()) && component.contains(&e.to.as_str())
                })
                .map(|e| e.file.as_str())
                .collect();
            out.push(format!(
                "modules {} import each other (in {})",
                component.join(", "),
                files.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    out
}

/// Tarjan's algorithm.
fn strongly_connected<'a>(graph: &BTreeMap<&'a str, BTreeSet<&'a str>>) -> Vec<Vec<&'a str>> {
    struct State<'a> {
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<&'a str>>,
    }
    fn visit<'a>(v: &'a str, g: &BTreeMap<&'a str, BTreeSet<&'a str>>, s: &mut State<'a>) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for &w in &g[v] {
            if !s.index.contains_key(w) {
                visit(w, g, s);
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
                component.push(w);
                if w == v {
                    break;
                }
            }
            component.sort();
            s.out.push(component);
        }
    }
    let mut s = State {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for &v in graph.keys() {
        if !s.index.contains_key(v) {
            visit(v, graph, &mut s);
        }
    }
    s.out
}

fn sources() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<(PathBuf, String)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .expect("read src")
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, base, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&p).expect("read source");
                out.push((p.strip_prefix(base).expect("under src").to_owned(), text));
            }
        }
    }
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    walk(&base, &base, &mut out);
    out
}

fn all_edges() -> Vec<Edge> {
    sources()
        .iter()
        .flat_map(|(rel, text)| edges_of(rel, text))
        .collect()
}

#[test]
fn every_import_points_down_and_no_modules_form_a_cycle() {
    let found = violations(&all_edges());
    assert!(
        found.is_empty(),
        "the layer rule of ARCHITECTURE.md is broken:\n  {}",
        found.join("\n  ")
    );
}

#[test]
fn every_top_level_module_has_a_layer() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"))
        .expect("read lib.rs");
    for line in code_only(&lib).lines() {
        if let Some(name) = line
            .trim()
            .strip_prefix("pub mod ")
            .or_else(|| line.trim().strip_prefix("mod "))
        {
            let name = name.trim_end_matches(';').trim();
            assert!(
                unit_of(name).is_some(),
                "module `{name}` has no layer in LAYERS"
            );
        }
    }
}

/// The checker itself: a deliberately added upward import, a module imported around the
/// wiring, and a cycle inside one layer are each reported, through the same path as the tree.
#[test]
fn the_checker_reports_an_upward_import_a_bypass_and_a_cycle() {
    let upward = edges_of(
        Path::new("store/mod.rs"),
        "use crate::agents::create_tables;\n",
    );
    let found = violations(&upward);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].contains("`store` (store) imports `agents` (domain), a higher layer"),
        "{found:?}"
    );

    // The same import on the real tree, as if it had been added to store/mod.rs.
    let mut tree = all_edges();
    tree.extend(upward);
    assert!(!violations(&tree).is_empty());

    let bypass = edges_of(
        Path::new("http/mod.rs"),
        "fn f() { let _ = crate::server::start; }",
    );
    let found = violations(&bypass);
    assert!(
        found.iter().any(|v| v.contains("higher layer")),
        "{found:?}"
    );
    assert!(
        found.iter().any(|v| v.contains("only the command line")),
        "{found:?}"
    );

    let mut cycle = edges_of(Path::new("http/mqtt.rs"), "use crate::mqtt::Shared;");
    cycle.extend(edges_of(
        Path::new("mqtt/client.rs"),
        "use crate::{clock, http::{self, ApiError}};",
    ));
    let found = violations(&cycle);
    assert_eq!(
        found,
        vec!["modules http, mqtt import each other (in http/mqtt.rs, mqtt/client.rs)".to_string()]
    );
}

#[test]
fn the_lexer_ignores_comments_and_strings_and_expands_groups() {
    let src = "// use crate::server;\n/// [`crate::server::Running`]\nconst S: &str = \"crate::server\";\nuse crate::{auth::{self, Zid}, ledger::log::{read, Entry}};\nfn f() { crate::clock::now_ms(); }\n";
    let edges = edges_of(Path::new("pages/mod.rs"), src);
    let to: Vec<&str> = edges.iter().map(|e| e.to.as_str()).collect();
    assert_eq!(to, ["auth", "clock", "ledger::log"]);
}

/// Longest function outside tests, in lines (signature to closing brace).
const MAX_FN_LINES: usize = 120;

/// Functions allowed to be longer: (file prefix, function; "" for every function of the file).
const LENGTH_EXEMPT: &[(&str, &str)] = &[];

/// `(file, function, lines)` for every function longer than [`MAX_FN_LINES`], skipping test
/// files and `#[cfg(test)]` modules. A function ends at the first `}` at its own indentation.
fn long_functions() -> Vec<(String, String, usize)> {
    let mut out = Vec::new();
    for (rel, text) in sources() {
        let file = rel.display().to_string();
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name == "tests.rs" || name.ends_with("_tests.rs") || name == "proptests.rs" {
            continue;
        }
        let code = code_only(&text);
        let lines: Vec<&str> = code.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            let line = lines[i];
            let trimmed = line.trim_start();
            if trimmed.starts_with("#[cfg(test)]") {
                // Skip the test module (or item) that follows, to its closing brace.
                let indent = line.len() - trimmed.len();
                let close = format!("{}}}", " ".repeat(indent));
                while i < lines.len() && lines[i].trim_end() != close {
                    i += 1;
                }
                i += 1;
                continue;
            }
            let sig = trimmed
                .trim_start_matches("pub(crate) ")
                .trim_start_matches("pub(super) ")
                .trim_start_matches("pub ")
                .trim_start_matches("const ")
                .trim_start_matches("async ")
                .trim_start_matches("unsafe ");
            if let Some(rest) = sig.strip_prefix("fn ") {
                let fname: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                // The body runs from the first `{` to the brace that balances it; a `;` before
                // any `{` is a declaration without a body.
                let (mut depth, mut opened, mut end) = (0i64, false, None);
                'scan: for (k, l) in lines.iter().enumerate().skip(i) {
                    for c in l.chars() {
                        match c {
                            ';' if !opened => break 'scan,
                            '{' => {
                                depth += 1;
                                opened = true;
                            }
                            '}' => {
                                depth -= 1;
                                if opened && depth == 0 {
                                    end = Some(k);
                                    break 'scan;
                                }
                            }
                            _ => {}
                        }
                    }
                }
                let exempt = LENGTH_EXEMPT
                    .iter()
                    .any(|(f, n)| file.starts_with(f) && (n.is_empty() || *n == fname));
                if let Some(end) = end {
                    let len = end - i + 1;
                    if len > MAX_FN_LINES && !exempt {
                        out.push((file.clone(), fname, len));
                    }
                }
            }
            i += 1;
        }
    }
    out
}

#[test]
fn no_function_outside_tests_is_over_120_lines() {
    let long = long_functions();
    assert!(
        long.is_empty(),
        "functions over {MAX_FN_LINES} lines (split them into named steps):\n{}",
        long.iter()
            .map(|(f, n, l)| format!("  {f}: {n} ({l} lines)"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
