//! The module graph, held against [`LAYERS`]: every top-level module of `src/` is in exactly
//! one layer, imports only modules of its own layer or below, and no two modules import
//! each other, directly or through others.
//!
//! Runs as a unit test (`cargo test --lib layering`), reading the source with `std::fs`: a
//! reference is any `crate::` path in code (`use crate::a::B`, `use crate::{a, b}`,
//! `crate::a::f()`, `$crate::a`) and any `super::` path that climbs out of its top-level
//! module. Comments and string literals are skipped, so doc links do not count. The lib.rs
//! documentation lists the same layers; the test checks that too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first: a module may import modules of its own layer and of the layers
/// before it. Keep the list in `src/lib.rs` ("# Layers") the same.
const LAYERS: &[(&str, &[&str])] = &[
    ("foundations", &["clock", "duration", "exit", "files", "net", "rate", "schema", "sys"]),
    (
        "mechanisms",
        &[
            "activation",
            "daemonize",
            "handoff",
            "limits",
            "logging",
            "pidfile",
            "pki",
            "poller",
            "privileges",
            "proxy_protocol",
            "scoreboard",
            "sdnotify",
            "shared",
            "signals",
            "status_json",
            "upstream",
        ],
    ),
    ("services", &["services", "tls"]),
    ("configuration", &["config", "import"]),
    ("serving", &["checker", "listener", "spawner", "worker"]),
    ("supervising", &["master"]),
    ("entry points", &["cli", "control", "daemon"]),
];

/// One reference from a file to another top-level module.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Import {
    from: String,
    to: String,
    file: PathBuf,
    line: usize,
}

fn source_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// The module path of a file under `src/`: `limits/region.rs` is `["limits", "region"]`,
/// `limits/mod.rs` is `["limits"]`; `lib.rs` and `main.rs` are the root, `[]`.
fn module_path(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> =
        relative.with_extension("").iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if parts.len() == 1 && (parts[0] == "lib" || parts[0] == "main") {
        parts.clear();
    }
    parts
}

/// `source` with comments, string and character literals blanked out (newlines kept, so
/// line numbers stay right).
fn code_only(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && starts_word(&chars, i) {
            // A raw string: r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            let closes = |k: usize| {
                chars.get(k) == Some(&'"') && (1..=hashes).all(|h| chars.get(k + h) == Some(&'#'))
            };
            while j < chars.len() && !closes(j) {
                j += 1;
            }
            let end = (j + 1 + hashes).min(chars.len());
            out.extend(chars[i..end].iter().map(|&c| blank(c)));
            i = end;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                let skip = if chars[i] == '\\' { 2 } else { 1 };
                out.extend(chars[i..(i + skip).min(chars.len())].iter().map(|&c| blank(c)));
                i += skip;
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A character literal ('"', '\'', '\u{..}'), or a lifetime ('a), left as is.
            let end = if next == Some('\\') {
                (i + 3..chars.len()).find(|&k| chars[k] == '\'').map(|k| k + 1)
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 3)
            } else {
                None
            };
            match end {
                Some(end) => {
                    out.extend(chars[i..end].iter().map(|&c| blank(c)));
                    i = end;
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

/// Whether position `at` starts a word (a `b` prefix, as in `br"..."`, counts as none).
fn starts_word(chars: &[char], at: usize) -> bool {
    let before = |k: usize| k.checked_sub(1).and_then(|k| chars.get(k)).copied();
    match before(at) {
        Some('b') => !before(at - 1).is_some_and(is_ident),
        Some(c) => !is_ident(c),
        None => true,
    }
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The identifier starting at `at` in `chars`, skipping blanks.
fn ident_at(chars: &[char], mut at: usize) -> (String, usize) {
    while chars.get(at).is_some_and(|c| c.is_whitespace()) {
        at += 1;
    }
    let start = at;
    while chars.get(at).is_some_and(|&c| is_ident(c)) {
        at += 1;
    }
    (chars[start..at].iter().collect(), at)
}

/// The first names of a use tree's group: `{a, b::{c, d}, self}` gives `a`, `b`, `self`.
fn group_heads(chars: &[char], open: usize) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut expect_head = true;
    let mut at = open;
    while at < chars.len() {
        match chars[at] {
            '{' => {
                depth += 1;
                if depth == 1 {
                    expect_head = true;
                }
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => expect_head = true,
            c if depth == 1 && expect_head && is_ident(c) => {
                let (name, end) = ident_at(chars, at);
                heads.push(name);
                expect_head = false;
                at = end;
                continue;
            }
            _ => {}
        }
        at += 1;
    }
    heads
}

/// Every top-level module `code` (of the file whose module path is `module`) refers to,
/// with its line, its own excluded.
fn references(module: &[String], code: &str) -> Vec<(String, usize)> {
    let chars: Vec<char> = code.chars().collect();
    let line_of = |at: usize| chars[..at].iter().filter(|&&c| c == '\n').count() + 1;
    let mut found = Vec::new();
    // Inline modules (`mod tests { ... }`) nest below the file's module: `super` inside one
    // names the file's module again.
    let mut inline: Vec<usize> = Vec::new();
    let mut depth = 0usize;
    let mut at = 0;
    while at < chars.len() {
        let c = chars[at];
        if c == '{' {
            depth += 1;
            at += 1;
            continue;
        }
        if c == '}' {
            depth = depth.saturating_sub(1);
            if inline.last() == Some(&depth) {
                inline.pop();
            }
            at += 1;
            continue;
        }
        if !is_ident(c) || (at > 0 && is_ident(chars[at - 1])) {
            at += 1;
            continue;
        }
        let (word, end) = ident_at(&chars, at);
        if word == "mod" {
            let (_, after_name) = ident_at(&chars, end);
            let mut k = after_name;
            while chars.get(k).is_some_and(|c| c.is_whitespace()) {
                k += 1;
            }
            if chars.get(k) == Some(&'{') {
                inline.push(depth);
            }
            at = after_name;
            continue;
        }
        if word != "crate" && word != "super" {
            at = end;
            continue;
        }
        // Climb: `crate` is the root; each `super` one module up from where this code is.
        let mut here: Vec<String> = module.to_vec();
        here.extend(std::iter::repeat_n(String::new(), inline.len()));
        let mut k = at;
        let mut rooted = false;
        loop {
            let (segment, after) = ident_at(&chars, k);
            let path_sep = chars.get(after) == Some(&':') && chars.get(after + 1) == Some(&':');
            match segment.as_str() {
                "crate" if k == at && path_sep => {
                    here.clear();
                    rooted = true;
                }
                "super" if path_sep => {
                    if here.pop().is_none() {
                        break;
                    }
                    rooted = here.is_empty();
                }
                _ => break,
            }
            k = after + 2;
            if rooted {
                break;
            }
        }
        if !rooted {
            at = k.max(end);
            continue;
        }
        let line = line_of(at);
        let mut next = k;
        while chars.get(next).is_some_and(|c| c.is_whitespace()) {
            next += 1;
        }
        let targets = if chars.get(next) == Some(&'{') {
            group_heads(&chars, next)
        } else {
            vec![ident_at(&chars, next).0]
        };
        for target in targets {
            if !target.is_empty() && target != "self" && Some(&target) != module.first() {
                found.push((target, line));
            }
        }
        at = next.max(end);
    }
    found
}

/// Every cross-module reference in `src/`.
fn imports() -> Vec<Import> {
    let root = source_root();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    files.sort();
    let mut imports = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&root).expect("under src/").to_owned();
        let module = module_path(&relative);
        if module.is_empty() {
            continue;
        }
        let source = std::fs::read_to_string(&file).expect("a readable source file");
        for (to, line) in references(&module, &code_only(&source)) {
            imports.push(Import { from: module[0].clone(), to, file: relative.clone(), line });
        }
    }
    imports
}

/// The public modules lib.rs declares (`pub mod NAME;`): this test module is not one.
fn top_level_modules() -> BTreeSet<String> {
    let lib = std::fs::read_to_string(source_root().join("lib.rs")).expect("src/lib.rs");
    lib.lines()
        .filter_map(|l| l.strip_prefix("pub mod")?.trim().strip_suffix(';').map(str::to_owned))
        .collect()
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, modules)| modules.contains(&module))
}

/// Cycles of `edges`, each as the modules on it (Tarjan's strongly connected components of
/// more than one module).
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Search<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    impl<'a> Search<'a> {
        fn visit(&mut self, node: &'a str) {
            let n = self.index.len();
            self.index.insert(node, n);
            self.low.insert(node, n);
            self.stack.push(node);
            self.on_stack.insert(node);
            for next in self.edges.get(node).into_iter().flatten() {
                let next = next.as_str();
                if !self.index.contains_key(next) {
                    self.visit(next);
                    let low = self.low[node].min(self.low[next]);
                    self.low.insert(node, low);
                } else if self.on_stack.contains(next) {
                    let low = self.low[node].min(self.index[next]);
                    self.low.insert(node, low);
                }
            }
            if self.low[node] == self.index[node] {
                let mut component = Vec::new();
                while let Some(top) = self.stack.pop() {
                    self.on_stack.remove(top);
                    component.push(top.to_owned());
                    if top == node {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut search = Search {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for node in edges.keys() {
        if !search.index.contains_key(node.as_str()) {
            search.visit(node);
        }
    }
    search.found
}

#[test]
fn every_module_is_in_one_layer() {
    let modules = top_level_modules();
    let mut listed = BTreeSet::new();
    for (_, layer) in LAYERS {
        for module in *layer {
            assert!(listed.insert(*module), "{module} is listed in two layers");
        }
    }
    let unlisted: Vec<_> = modules.iter().filter(|m| !listed.contains(m.as_str())).collect();
    assert!(unlisted.is_empty(), "modules in no layer (add them to LAYERS): {unlisted:?}");
    let gone: Vec<_> = listed.iter().filter(|m| !modules.contains(**m)).collect();
    assert!(gone.is_empty(), "LAYERS lists modules that do not exist: {gone:?}");
}

#[test]
fn no_module_imports_from_a_higher_layer() {
    let upward: Vec<String> = imports()
        .into_iter()
        .filter(|i| match (layer_of(&i.from), layer_of(&i.to)) {
            (Some(from), Some(to)) => to > from,
            _ => false,
        })
        .map(|i| {
            let (from, to) = (layer_of(&i.from).unwrap_or(0), layer_of(&i.to).unwrap_or(0));
            format!(
                "src/{}:{}: {} ({}) imports {} ({})",
                i.file.display(),
                i.line,
                i.from,
                LAYERS[from].0,
                i.to,
                LAYERS[to].0
            )
        })
        .collect();
    assert!(upward.is_empty(), "upward imports:\n{}", upward.join("\n"));
}

#[test]
fn the_module_graph_has_no_cycle() {
    let imports = imports();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for import in &imports {
        edges.entry(import.from.clone()).or_default().insert(import.to.clone());
    }
    let found = cycles(&edges);
    let described: Vec<String> = found
        .iter()
        .map(|cycle| {
            let sites: Vec<String> = imports
                .iter()
                .filter(|i| cycle.contains(&i.from) && cycle.contains(&i.to))
                .map(|i| format!("  src/{}:{}: {} -> {}", i.file.display(), i.line, i.from, i.to))
                .collect();
            format!("cycle among {}:\n{}", cycle.join(", "), sites.join("\n"))
        })
        .collect();
    assert!(found.is_empty(), "{}", described.join("\n"));
}

#[test]
fn lib_rs_lists_the_same_layers() {
    let lib = std::fs::read_to_string(source_root().join("lib.rs")).expect("src/lib.rs");
    // Items `N. name: [`a`], [`b`] ...`, continued on indented lines.
    let mut items: Vec<String> = Vec::new();
    for line in lib.lines().skip_while(|l| *l != "//! # Layers").skip(1) {
        let Some(text) = line.strip_prefix("//!") else { break };
        if text.starts_with(" #") {
            break;
        }
        let text = text.trim();
        if text.starts_with(|c: char| c.is_ascii_digit()) {
            items.push(text.to_owned());
        } else if let Some(item) = items.last_mut()
            && line.starts_with("//!    ")
        {
            item.push(' ');
            item.push_str(text);
        }
    }
    let written: Vec<(String, Vec<String>)> = items
        .iter()
        .map(|item| {
            let (name, modules) = item.split_once(':').expect("`N. name: modules`");
            let name = name.split_once(". ").map_or(name, |(_, n)| n).trim().to_owned();
            let modules = modules
                .split(',')
                .map(|m| m.trim().trim_end_matches('.').trim_matches(['[', ']', '`']).to_owned())
                .collect();
            (name, modules)
        })
        .collect();
    let expected: Vec<(String, Vec<String>)> = LAYERS
        .iter()
        .map(|(name, modules)| {
            ((*name).to_owned(), modules.iter().map(|m| (*m).to_owned()).collect())
        })
        .collect();
    assert_eq!(written, expected, "src/lib.rs \"# Layers\" differs from LAYERS");
}

#[test]
fn references_are_found_in_every_form() {
    let module = vec!["poller".to_owned(), "select".to_owned()];
    let code = code_only(
        "use crate::config::FD_SETSIZE;\nuse crate::{sys, logging::{A, B}};\n\
         // use crate::master;\nlet s = \"crate::worker\";\nfn f() { crate::limits::x(); }\n\
         use super::super::daemon;\nuse super::Event;\nmod tests { use super::super::super::cli; }\n\
         let c = '\"'; use crate::services;\n",
    );
    let found = references(&module, &code);
    let names: Vec<(&str, usize)> = found.iter().map(|(m, l)| (m.as_str(), *l)).collect();
    assert_eq!(
        names,
        [
            ("config", 1),
            ("sys", 2),
            ("logging", 2),
            ("limits", 5),
            ("daemon", 6),
            ("cli", 8),
            ("services", 9)
        ]
    );
}
