//! The tidy test: ARCHITECTURE.md's code map held to the code.
//!
//! - every `.rs` file under `src/` is named by exactly one row of the code
//!   map, as itself or through its folder (`src/engine/`), and every path a
//!   row names exists;
//! - `unsafe` appears in no Rust file of the workspace but [`FFI`], and
//!   there each use follows a `// SAFETY:` comment;
//! - the "may use" column of each `src/` row lists exactly the crate
//!   modules its files import: `crate::X` paths, and in `src/lib.rs` the
//!   paths through the modules it declares. Imports of the row's own module,
//!   `super::` paths, `#[cfg(test)]` items and the files of test-only
//!   modules do not count: a module's tests may use more.
//!
//! The column holds backticked module names, or "nothing" (words after it,
//! such as "(std only)", are allowed). Rows outside `src/` are checked only
//! for their paths.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

/// The one file allowed to hold `unsafe`: the libvirt checkpoint FFI.
const FFI: &str = "src/backend/libvirt/ffi.rs";

/// The workspace root (the library's package).
fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One row of the code map.
struct Row {
    /// The path cell as written, to name the row in messages.
    cell: String,
    /// The paths it names (a folder ends with `/`).
    paths: Vec<String>,
    /// The "may use" column: module names, or `None` for "nothing".
    may_use: Option<Vec<String>>,
    /// The "may use" cell as written.
    may_use_cell: String,
}

/// The backticked words of a markdown cell.
fn backticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// The rows of the table under "## Code map".
fn code_map() -> Vec<Row> {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let section = text
        .split("\n## Code map")
        .nth(1)
        .expect("ARCHITECTURE.md has a \"## Code map\" section");
    let section = section.split("\n## ").next().unwrap();
    let mut rows = Vec::new();
    for line in section.lines().map(str::trim) {
        if !line.starts_with('|') || line.starts_with("|---") || line.starts_with("| path ") {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(
            cells.len(),
            3,
            "code map row with {} cells (path | holds | may use): {line}",
            cells.len()
        );
        let paths = backticked(cells[0]);
        assert!(!paths.is_empty(), "code map row names no path: {line}");
        let may_use = if cells[2].starts_with("nothing") {
            None
        } else {
            Some(backticked(cells[2]))
        };
        rows.push(Row {
            cell: cells[0].to_string(),
            paths,
            may_use,
            may_use_cell: cells[2].to_string(),
        });
    }
    assert!(rows.len() > 5, "the code map table was not found");
    rows
}

/// Every file under `dir` ending in `ext`, relative to the root, sorted;
/// `target/` and hidden folders left out.
fn files_under(dir: &Path, ext: &str, out: &mut Vec<String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                files_under(&path, ext, out);
            }
        } else if name.ends_with(ext) {
            let rel = path.strip_prefix(root()).unwrap();
            out.push(rel.to_string_lossy().into_owned());
        }
    }
}

/// The library's Rust files: `src/**/*.rs`.
fn library_files() -> Vec<String> {
    let mut files = Vec::new();
    files_under(&root().join("src"), ".rs", &mut files);
    files
}

/// Does the row's `path` name `file`, as itself or through its folder?
fn names(path: &str, file: &str) -> bool {
    if path.ends_with('/') {
        file.starts_with(path)
    } else {
        file == path
    }
}

// ---------------------------------------------------------------------------
// Rust source, code only.

/// `src` with comments and the contents of string and character literals
/// blanked out (newlines kept, so line numbers stay).
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            let end = rest
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |n| i + n);
            blank(&mut out, i, end);
            i = end;
        } else if rest.starts_with(b"/*") {
            let (mut depth, mut j) = (0, i);
            while j < b.len() {
                if b[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if (rest.starts_with(b"r\"") || rest.starts_with(b"r#") || rest.starts_with(b"br"))
            && (i == 0 || !ident(b[i - 1]))
            && raw_string_end(b, i).is_some()
        {
            let end = raw_string_end(b, i).unwrap();
            blank(&mut out, i, end);
            i = end;
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            blank(&mut out, i + 1, j.min(b.len()));
            i = j + 1;
        } else if b[i] == b'\'' {
            // A character literal ('x', '\n', '\u{..}'), else a lifetime.
            let end = if rest.get(1) == Some(&b'\\') {
                rest.iter()
                    .skip(2)
                    .position(|&c| c == b'\'')
                    .map(|n| i + n + 3)
            } else {
                let ch = src[i + 1..].chars().next().map_or(0, char::len_utf8);
                (rest.get(1 + ch) == Some(&b'\'')).then_some(i + 2 + ch)
            };
            match end {
                Some(end) => {
                    blank(&mut out, i + 1, end - 1);
                    i = end;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    String::from_utf8(out).expect("only ASCII bytes were blanked")
}

/// The end of a raw (byte) string literal starting at `i`, if one does.
fn raw_string_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + if b[i] == b'b' { 2 } else { 1 };
    let hashes = b[j..].iter().take_while(|&&c| c == b'#').count();
    j += hashes;
    if b.get(j) != Some(&b'"') {
        return None;
    }
    let close: Vec<u8> = std::iter::once(b'"')
        .chain(std::iter::repeat_n(b'#', hashes))
        .collect();
    let from = j + 1;
    b[from..]
        .windows(close.len())
        .position(|w| w == close.as_slice())
        .map(|n| from + n + close.len())
}

/// `code` without its `#[cfg(test)]` items, and the names of the
/// test-only modules it declares (`#[cfg(test)] mod tests;`).
fn without_tests(code: &str) -> (String, Vec<String>) {
    const ATTR: &str = "#[cfg(test)]";
    let mut out = code.to_string();
    let mut test_modules = Vec::new();
    let mut from = 0;
    while let Some(n) = code[from..].find(ATTR) {
        let start = from + n;
        let b = code.as_bytes();
        let (mut j, mut depth) = (start + ATTR.len(), 0i32);
        let end = loop {
            match b.get(j) {
                None => break b.len(),
                Some(b'(' | b'[') => depth += 1,
                Some(b')' | b']') => depth -= 1,
                Some(b';') if depth == 0 => break j + 1,
                Some(b'{') if depth == 0 => break matching_brace(b, j) + 1,
                _ => {}
            }
            j += 1;
        };
        let item: Vec<&str> = code[start + ATTR.len()..end]
            .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ';'))
            .filter(|w| !w.is_empty())
            .collect();
        if let Some(k) = item.iter().position(|w| *w == "mod") {
            if let Some(name) = item.get(k + 1).and_then(|w| w.strip_suffix(';')) {
                test_modules.push(name.to_string());
            }
        }
        out.replace_range(
            start..end,
            &code[start..end].replace(|c: char| c != '\n', " "),
        );
        from = end;
    }
    (out, test_modules)
}

/// The index of the `}` that closes the `{` at `open`.
fn matching_brace(b: &[u8], open: usize) -> usize {
    let mut depth = 0;
    for (k, &c) in b.iter().enumerate().skip(open) {
        match c {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return k;
                }
            }
            _ => {}
        }
    }
    b.len() - 1
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The leading identifier of `s` (after blanks).
fn leading_ident(s: &str) -> &str {
    let s = s.trim_start();
    &s[..s.find(|c: char| !is_ident(c)).unwrap_or(s.len())]
}

/// The first path segments of a use tree's items: `{a::b, c}` → a, c.
fn group_heads(group: &str) -> Vec<&str> {
    let (mut depth, mut start, mut heads) = (0, 0, Vec::new());
    for (k, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                heads.push(leading_ident(&group[start..k]));
                start = k + 1;
            }
            _ => {}
        }
    }
    heads.push(leading_ident(&group[start..]));
    heads.into_iter().filter(|h| !h.is_empty()).collect()
}

/// The crate modules `code` reaches through `crate::` paths, each with the
/// line of its first use.
fn crate_paths(code: &str) -> BTreeMap<String, usize> {
    let mut found = BTreeMap::new();
    for (at, _) in code.match_indices("crate::") {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| is_ident(c) || c == '$') {
            continue;
        }
        let line = code[..at].matches('\n').count() + 1;
        let rest = code[at + "crate::".len()..].trim_start();
        let heads = if let Some(group) = rest.strip_prefix('{') {
            let close = matching_brace(rest.as_bytes(), 0);
            group_heads(&group[..close - 1])
        } else {
            vec![leading_ident(rest)]
        };
        for head in heads {
            found.entry(head.to_string()).or_insert(line);
        }
    }
    found
}

/// The modules `src/lib.rs` declares, and the modules its own paths go
/// through (`pub use backend::…`).
fn root_modules(lib: &str) -> (BTreeSet<String>, BTreeMap<String, usize>) {
    let mut declared = BTreeSet::new();
    for line in lib.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(k) = words.iter().position(|w| *w == "mod") {
            if let Some(name) = words.get(k + 1).and_then(|w| w.strip_suffix(';')) {
                declared.insert(name.to_string());
            }
        }
    }
    let mut used = BTreeMap::new();
    for (n, line) in lib.lines().enumerate() {
        let words = line.split(|c: char| !(is_ident(c) || c == ':'));
        for w in words {
            if let Some((head, _)) = w.split_once("::") {
                if declared.contains(head) {
                    used.entry(head.to_string()).or_insert(n + 1);
                }
            }
        }
    }
    (declared, used)
}

/// The top-level module `file` belongs to (`src/backend/fake.rs` →
/// `backend`); `None` for the crate root.
fn own_module(file: &str) -> Option<String> {
    let inside = file.strip_prefix("src/").unwrap();
    let first = inside.split('/').next().unwrap();
    match first {
        "lib.rs" => None,
        f => Some(f.trim_end_matches(".rs").to_string()),
    }
}

/// The files of test-only modules (`#[cfg(test)] mod tests;` in `file`).
fn test_files(file: &str, modules: &[String]) -> Vec<String> {
    let dir = match file.rsplit_once('/') {
        Some((dir, "mod.rs" | "lib.rs" | "main.rs")) => dir.to_string(),
        _ => file.trim_end_matches(".rs").to_string(),
    };
    modules
        .iter()
        .flat_map(|m| [format!("{dir}/{m}.rs"), format!("{dir}/{m}/mod.rs")])
        .collect()
}

// ---------------------------------------------------------------------------
// The checks.

#[test]
fn every_file_of_src_is_in_the_code_map_once() {
    let rows = code_map();
    let mut errors = String::new();
    for row in &rows {
        for path in &row.paths {
            if !root().join(path).exists() {
                writeln!(errors, "row {}: {path} does not exist", row.cell).unwrap();
            }
        }
    }
    let files = library_files();
    for file in &files {
        let naming: Vec<&str> = rows
            .iter()
            .filter(|r| r.paths.iter().any(|p| names(p, file)))
            .map(|r| r.cell.as_str())
            .collect();
        match naming.len() {
            1 => {}
            0 => writeln!(errors, "{file} is named by no row of the code map").unwrap(),
            _ => writeln!(
                errors,
                "{file} is named by {} rows: {naming:?}",
                naming.len()
            )
            .unwrap(),
        }
    }
    assert!(errors.is_empty(), "ARCHITECTURE.md's code map:\n{errors}");
    println!(
        "tidy: {} rows, {} files of src/ each named once",
        rows.len(),
        files.len()
    );
}

#[test]
fn unsafe_only_in_the_ffi_file() {
    let mut files = Vec::new();
    files_under(root(), ".rs", &mut files);
    assert!(files.iter().any(|f| f == FFI), "{FFI} does not exist");
    let mut errors = String::new();
    let mut in_ffi = 0;
    for file in &files {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        let code = code_only(&text);
        let lines: Vec<&str> = text.lines().collect();
        for (n, line) in code.lines().enumerate() {
            let has_unsafe = line.match_indices("unsafe").any(|(at, _)| {
                !line[..at].chars().next_back().is_some_and(is_ident)
                    && !line[at + "unsafe".len()..]
                        .chars()
                        .next()
                        .is_some_and(is_ident)
            });
            if !has_unsafe {
                continue;
            }
            if file != FFI {
                writeln!(errors, "{file}:{}: `unsafe` outside {FFI}", n + 1).unwrap();
                continue;
            }
            in_ffi += 1;
            let safety = lines[..n]
                .iter()
                .rev()
                .take_while(|l| l.trim_start().starts_with("//"))
                .any(|l| l.contains("SAFETY:"));
            if !safety {
                writeln!(
                    errors,
                    "{file}:{}: `unsafe` without a `// SAFETY:` comment above",
                    n + 1
                )
                .unwrap();
            }
        }
    }
    assert!(errors.is_empty(), "{errors}");
    assert!(in_ffi > 0, "{FFI} holds no `unsafe`: move the constant FFI");
    println!(
        "tidy: {} Rust files, `unsafe` only in {FFI} ({in_ffi} uses, each under a SAFETY comment)",
        files.len()
    );
}

#[test]
fn may_use_matches_the_imports() {
    let rows = code_map();
    let files = library_files();
    let read = |f: &str| std::fs::read_to_string(root().join(f)).unwrap();
    let lib_code = without_tests(&code_only(&read("src/lib.rs"))).0;
    let (modules, _) = root_modules(&lib_code);

    // Each file's imports, and the files of test-only modules.
    let mut imports: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
    let mut test_only = BTreeSet::new();
    for file in &files {
        let (code, tests) = without_tests(&code_only(&read(file)));
        test_only.extend(test_files(file, &tests));
        let mut used = crate_paths(&code);
        if file == "src/lib.rs" {
            used.extend(root_modules(&code).1);
        }
        imports.insert(file, used);
    }

    let mut errors = String::new();
    let mut checked = 0;
    for row in rows
        .iter()
        .filter(|r| r.paths.iter().any(|p| p.starts_with("src/")))
    {
        let listed: BTreeSet<String> = match &row.may_use {
            None => BTreeSet::new(),
            Some(names) if names.is_empty() => {
                writeln!(
                    errors,
                    "row {}: \"may use\" must be backticked module names or \"nothing\", not {:?}",
                    row.cell, row.may_use_cell
                )
                .unwrap();
                continue;
            }
            Some(names) => names.iter().cloned().collect(),
        };
        for name in listed.difference(&modules) {
            writeln!(
                errors,
                "row {}: \"may use\" lists `{name}`, which is not a module of src/lib.rs",
                row.cell
            )
            .unwrap();
        }
        let mine: Vec<&String> = files
            .iter()
            .filter(|f| row.paths.iter().any(|p| names(p, f)) && !test_only.contains(*f))
            .collect();
        let own: BTreeSet<String> = mine.iter().filter_map(|f| own_module(f)).collect();
        // Module → the first file and line that imports it.
        let mut used: BTreeMap<String, String> = BTreeMap::new();
        for file in &mine {
            for (module, line) in &imports[file.as_str()] {
                if own.contains(module) {
                    continue;
                }
                used.entry(module.clone())
                    .or_insert_with(|| format!("{file}:{line}"));
            }
        }
        for (module, at) in &used {
            if !modules.contains(module) {
                writeln!(
                    errors,
                    "row {}: {at} imports `crate::{module}`, which is not a module: import it from its module",
                    row.cell
                )
                .unwrap();
            } else if !listed.contains(module) {
                writeln!(
                    errors,
                    "row {}: imports `{module}` ({at}), which \"may use\" does not list",
                    row.cell
                )
                .unwrap();
            }
        }
        for module in listed.intersection(&modules) {
            if !used.contains_key(module) {
                writeln!(
                    errors,
                    "row {}: \"may use\" lists `{module}`, which its files do not import",
                    row.cell
                )
                .unwrap();
            }
        }
        checked += 1;
    }
    assert!(
        errors.is_empty(),
        "ARCHITECTURE.md's \"may use\" column against the imports:\n{errors}"
    );
    println!("tidy: \"may use\" of {checked} rows matches the imports of their files");
}

#[test]
fn the_tidy_parsers_read_what_they_should() {
    // Comments, strings and characters are blanked; lifetimes are kept.
    let code = code_only(
        "let a = \"unsafe crate::x\"; // unsafe\n/* crate::y /* nested */ */ fn f<'a>(c: &'a u8) -> char { '\"' }\nlet r = r#\"crate::z\"#;",
    );
    assert!(
        !code.contains("unsafe") && !code.contains("crate::"),
        "{code}"
    );
    assert!(code.contains("fn f<'a>(c: &'a u8)"), "{code}");
    assert_eq!(code.lines().count(), 3);
    // `crate::` paths, single and grouped; `$crate` and `pub(crate)` are not.
    let used = crate_paths(
        "use crate::chain::Chain;\nuse crate::{backend::{A, B}, xml};\npub(crate) fn f() { crate::owner::now(); $crate::x }",
    );
    let names: Vec<&str> = used.keys().map(String::as_str).collect();
    assert_eq!(names, ["backend", "chain", "owner", "xml"]);
    assert_eq!(used["owner"], 3);
    // `#[cfg(test)]` items go, with the test-only modules they declare.
    let (code, tests) = without_tests(
        "use crate::a;\n#[cfg(test)]\nuse crate::b;\n#[cfg(test)]\nmod tests {\n    use crate::c;\n}\n#[cfg(test)]\nmod more;\n",
    );
    assert_eq!(crate_paths(&code).keys().collect::<Vec<_>>(), ["a"]);
    assert_eq!(tests, ["more"]);
    assert_eq!(
        test_files("src/plan/mod.rs", &tests),
        ["src/plan/more.rs", "src/plan/more/mod.rs"]
    );
    assert_eq!(test_files("src/xml.rs", &tests)[0], "src/xml/more.rs");
    // The crate root's own paths through the modules it declares.
    let (declared, used) =
        root_modules("mod chain;\npub mod testing;\npub use chain::Chain;\npub use std::fmt;\n");
    assert_eq!(declared.iter().collect::<Vec<_>>(), ["chain", "testing"]);
    assert_eq!(used.keys().collect::<Vec<_>>(), ["chain"]);
    assert_eq!(
        own_module("src/backend/libvirt/ffi.rs").as_deref(),
        Some("backend")
    );
    assert_eq!(own_module("src/lib.rs"), None);
}
