//! The wire format is defined once: every JSON example in README.md is
//! read into the library type it documents (unknown keys refused) and
//! written back, and must come out equal, with its keys in the same order.
//! An example that drifts from the types, or a type that drifts from the
//! README, fails here.

use ckptstore::{
    Chain, EnsureReport, ErrorDoc, History, Metrics, PlanReport, ReclaimReport, RecoverReport,
    Report, Status, SyncReport,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A failure document without a report: only `error`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Failure {
    error: ErrorDoc,
}

/// The README's examples: (the type named in `<!-- wire: T -->`, the JSON).
fn examples() -> Vec<(String, String)> {
    let readme = include_str!("../../README.md");
    let mut out = Vec::new();
    let mut rest = readme;
    while let Some(at) = rest.find("<!-- wire: ") {
        let after = &rest[at + "<!-- wire: ".len()..];
        let (name, after) = after.split_once(" -->").expect("a closed marker");
        let body = after
            .trim_start()
            .strip_prefix("```json\n")
            .unwrap_or_else(|| panic!("the {name} marker is not followed by a json block"));
        let (json, after) = body.split_once("\n```").expect("a closed block");
        out.push((name.to_string(), json.to_string()));
        rest = after;
    }
    out
}

/// The keys of every object, in order, depth first.
fn key_order(v: &Value, path: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                out.push(format!("{path}.{k}"));
                key_order(v, &format!("{path}.{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                key_order(v, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn check<T: Serialize + DeserializeOwned>(name: &str, json: &str) {
    let example: Value = serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("the README's {name} example is not JSON: {e}"));
    let typed: T = serde_json::from_value(example.clone())
        .unwrap_or_else(|e| panic!("the README's {name} example does not fit the type: {e}"));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        back, example,
        "the README's {name} example loses or adds fields"
    );
    let (mut want, mut got) = (Vec::new(), Vec::new());
    key_order(&example, name, &mut want);
    key_order(&back, name, &mut got);
    assert_eq!(
        got, want,
        "the README's {name} example has its keys in another order"
    );
}

#[test]
fn every_json_example_in_the_readme_is_a_library_type() {
    let examples = examples();
    let mut seen = Vec::new();
    for (name, json) in &examples {
        match name.as_str() {
            "Chain" => check::<Chain>(name, json),
            "SyncReport" => check::<SyncReport>(name, json),
            "PlanReport" => check::<PlanReport>(name, json),
            "RecoverReport" => check::<RecoverReport>(name, json),
            "Status" => check::<Status>(name, json),
            "Report" => check::<Report>(name, json),
            "History" => check::<History>(name, json),
            "Metrics" => check::<Metrics>(name, json),
            "EnsureReport" => check::<EnsureReport>(name, json),
            "ReclaimReport" => check::<ReclaimReport>(name, json),
            "Failure" => check::<Failure>(name, json),
            "PruneReport" => check::<ckptstore::PruneReport>(name, json),
            other => panic!("the README names an unknown wire type {other}"),
        }
        seen.push(name.as_str());
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        [
            "Chain",
            "EnsureReport",
            "Failure",
            "History",
            "Metrics",
            "PlanReport",
            "PruneReport",
            "ReclaimReport",
            "RecoverReport",
            "Report",
            "Status",
            "SyncReport"
        ],
        "every document has its example"
    );
    println!(
        "wire: {} README examples match the library's types",
        examples.len()
    );
}

#[test]
fn the_readme_has_no_json_example_without_its_type() {
    let readme = include_str!("../../README.md");
    let blocks = readme.matches("```json").count();
    assert_eq!(
        blocks,
        examples().len(),
        "every ```json block in README.md is preceded by <!-- wire: Type -->"
    );
}
