//! Fuzzing the configuration parser with proptest: random YAML, and mutations of valid
//! documents (the seed ServiceEntry and DestinationRule, lb's own format). Parsing never
//! panics; a refusal is an `InvalidConfig` whose every error names the source and the
//! document (`fuzz.yaml document 2 (...)`) and a field path (or is about the document as a
//! whole, or the YAML text); mutations that keep the configuration valid still load.

use proptest::prelude::*;
use serde_json::{Map, Value};

use super::{
    parse_str,
    tests::{GOOD, HELLOWORLD_ENTRY, SEED_RULE},
    InvalidConfig,
};

const SOURCE: &str = "fuzz.yaml";
const STATES: [&str; 3] = ["active", "draining", "ejected"];

/// Errors about a document as a whole: no field to name.
const WHOLE_DOCUMENT: &[&str] = &[
    "a document is a mapping",
    "apiVersion and kind are missing",
    "the items of a List are resources",
];

fn documents() -> Vec<Value> {
    [HELLOWORLD_ENTRY, SEED_RULE, GOOD]
        .iter()
        .map(|text| serde_saphyr::from_str::<Value>(text).expect("seed documents are YAML"))
        .collect()
}

/// Every error names the source and a document, and a field path unless it is about the
/// text (not YAML) or the document as a whole.
fn check_errors(text: &str) -> Result<bool, TestCaseError> {
    let err = match parse_str(text, SOURCE) {
        Ok(_) => return Ok(true),
        Err(e) => e,
    };
    let invalid = match err.downcast::<InvalidConfig>() {
        Ok(i) => i,
        Err(other) => {
            return Err(TestCaseError::fail(format!(
                "not an InvalidConfig: {other:#}"
            )))
        }
    };
    prop_assert!(!invalid.errors.is_empty());
    for e in &invalid.errors {
        if e.starts_with(&format!("{SOURCE}: not valid YAML")) {
            continue;
        }
        let rest = e
            .strip_prefix(&format!("{SOURCE} document "))
            .ok_or_else(|| TestCaseError::fail(format!("names no document: {e}\n{text}")))?;
        // `<n>[ (<Kind> <ns>/<name>)]: <path>: <reason>` or `...: <reason>`.
        let after_label = match rest.find("): ") {
            Some(i) if rest.find(": ").is_none_or(|j| j > i) => &rest[i + 3..],
            _ => rest.split_once(": ").map(|(_, r)| r).unwrap_or(""),
        };
        let whole = WHOLE_DOCUMENT.iter().any(|w| after_label.starts_with(w));
        let has_path = after_label
            .split_once(": ")
            .is_some_and(|(path, _)| !path.is_empty() && !path.contains(' ') || path.contains('['));
        prop_assert!(whole || has_path, "names no field: {e}\n{text}");
    }
    Ok(false)
}

/// A scalar or small tree of any kind.
fn random_value(choice: u32, n: i64) -> Value {
    match choice % 12 {
        0 => Value::Null,
        1 => Value::Bool(n % 2 == 0),
        2 => Value::from(n),
        3 => Value::from(-n),
        4 => Value::from(n as f64 / 7.0),
        5 => Value::from(format!("{n}")),
        6 => Value::from("10.96.0.10"),
        7 => Value::from("1s"),
        8 => Value::Array(vec![Value::from(n), Value::Null]),
        9 => Value::Object(Map::from_iter([("x".to_string(), Value::from(n))])),
        10 => Value::from("region1/zone1"),
        _ => Value::from(""),
    }
}

/// Applies one mutation at a node chosen by `path` (indices into the tree).
fn mutate(v: &mut Value, path: &[u32], op: u32, n: i64) {
    let (here, deeper) = match path.split_first() {
        Some(p) => p,
        None => {
            *v = random_value(op, n);
            return;
        }
    };
    match v {
        Value::Object(map) if !map.is_empty() => {
            let key = map.keys().nth(*here as usize % map.len()).unwrap().clone();
            match op % 7 {
                0 if deeper.is_empty() => {
                    map.remove(&key);
                }
                1 if deeper.is_empty() => {
                    map.insert(format!("unknown{n}"), random_value(op / 7, n));
                }
                _ => mutate(map.get_mut(&key).unwrap(), deeper, op, n),
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let i = *here as usize % items.len();
            match op % 7 {
                0 if deeper.is_empty() => {
                    items.remove(i);
                }
                1 if deeper.is_empty() => {
                    let copy = items[i].clone();
                    items.push(copy);
                }
                _ => mutate(&mut items[i], deeper, op, n),
            }
        }
        _ => *v = random_value(op, n),
    }
}

fn render(docs: &[Value]) -> String {
    // JSON is YAML: each document in flow style.
    docs.iter()
        .map(|d| serde_json::to_string(d).unwrap())
        .collect::<Vec<_>>()
        .join("\n---\n")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// Mutations of the seed documents (1-4 each): values replaced by values of any kind,
    /// fields removed, unknown fields added, list items removed or repeated.
    #[test]
    fn mutated_documents_never_panic_and_errors_name_document_and_field(
        which in 0usize..4,
        mutations in prop::collection::vec(
            (prop::collection::vec(any::<u32>(), 0..7), any::<u32>(), any::<i64>()),
            1..5,
        ),
    ) {
        let mut docs = documents();
        if which < 3 {
            docs = vec![docs[which].clone()];
        }
        for (path, op, n) in &mutations {
            let at = path.first().copied().unwrap_or(0) as usize % docs.len();
            mutate(&mut docs[at], path, *op, *n % 70000);
        }
        check_errors(&render(&docs))?;
    }

    /// Arbitrary text, and the seed text with bytes replaced: never a panic, and every
    /// refusal is named.
    #[test]
    fn random_text_never_panics(
        text in "[ -~\n\t:{}\\[\\]#&*!|>'\"%@`-]{0,200}",
        edits in prop::collection::vec((any::<u16>(), any::<u8>()), 0..6),
    ) {
        check_errors(&text)?;
        let mut seed = format!("{HELLOWORLD_ENTRY}---{SEED_RULE}---{GOOD}").into_bytes();
        for (at, b) in edits {
            let i = at as usize % seed.len();
            seed[i] = b % 0x60 + 0x20; // printable ASCII
        }
        check_errors(&String::from_utf8(seed).unwrap())?;
    }

    /// Changes that keep a configuration valid: it still loads, with the services it says.
    #[test]
    fn valid_mutations_still_load(
        services in prop::collection::vec(
            (1u16..=65535, any::<bool>(), prop::collection::vec((1u8..=254, 1u16..=65535, 1u32..=1000, 0u8..3), 0..5)),
            1..6,
        ),
        port in 1u16..=65535,
        interval_ms in 1u64..=600_000,
        with_native_dataplane in any::<bool>(),
    ) {
        let mut docs = documents();
        // The ServiceEntry on another port, the rule with another interval.
        docs[0]["spec"]["ports"][0]["number"] = Value::from(port);
        docs[1]["spec"]["trafficPolicy"]["outlierDetection"]["interval"] =
            Value::from(format!("{interval_ms}ms"));
        // lb's own format: services generated on VIPs of their own.
        let native: Vec<Value> = services
            .iter()
            .enumerate()
            .map(|(i, (port, udp, backends))| {
                serde_json::json!({
                    "name": format!("s{i}"),
                    "vip": format!("10.97.{}.{}", i / 200, i % 200 + 1),
                    "port": port,
                    "protocol": if *udp { "UDP" } else { "TCP" },
                    "backends": backends
                        .iter()
                        .enumerate()
                        .map(|(j, (host, bport, weight, state))| serde_json::json!({
                            "address": format!("10.201.{j}.{host}"),
                            "port": bport,
                            "weight": weight,
                            "state": STATES[*state as usize],
                        }))
                        .collect::<Vec<_>>(),
                })
            })
            .collect();
        let mut own = Map::new();
        own.insert("services".into(), Value::Array(native));
        if with_native_dataplane {
            own.insert("dataplane".into(), docs[2]["dataplane"].clone());
        }
        docs[2] = Value::Object(own);
        let text = render(&docs);
        let loaded = parse_str(&text, SOURCE)
            .map_err(|e| TestCaseError::fail(format!("{e:#}\n{text}")))?;
        prop_assert_eq!(loaded.config.services.len(), 1 + services.len());
        prop_assert_eq!(loaded.config.services[0].frontend.port, port);
    }
}
