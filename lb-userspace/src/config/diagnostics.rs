//! Warnings and errors about configuration documents, and typed reads of generic YAML values
//! that report what is wrong with a field instead of failing on the first surprise.
//!
//! Every message names the document (`lb.yaml document 2 (DestinationRule default/helloworld)`),
//! the field path (`spec.trafficPolicy.outlierDetection.interval`) and the reason.

use std::{collections::BTreeMap, fmt::Display, time::Duration};

use serde_json::{Map, Value};

use super::duration::{parse_go_duration, DurationError};

/// Everything found while reading a configuration.
#[derive(Debug, Default)]
pub(super) struct Report {
    pub warnings: Vec<String>,
    pub errors: Vec<String>,
}

impl Report {
    pub fn warning(&mut self, label: &str, path: &str, reason: impl Display) {
        self.warnings.push(message(label, path, reason));
    }

    pub fn error(&mut self, label: &str, path: &str, reason: impl Display) {
        self.errors.push(message(label, path, reason));
    }
}

fn message(label: &str, path: &str, reason: impl Display) -> String {
    if path.is_empty() {
        format!("{label}: {reason}")
    } else {
        format!("{label}: {path}: {reason}")
    }
}

/// A configuration that was refused: every error found, and the warnings seen on the way.
#[derive(Debug, thiserror::Error)]
pub struct InvalidConfig {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

impl Display for InvalidConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.errors.as_slice() {
            [one] => f.write_str(one),
            all => {
                write!(f, "{} errors in the configuration:", all.len())?;
                for e in all {
                    write!(f, "\n  {e}")?;
                }
                Ok(())
            }
        }
    }
}

/// What a field that lb does not know means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum UnknownFields {
    /// Istio resources: users' real YAML carries many fields lb has no use for yet.
    Warn,
    /// lb's own documents: a field lb does not know is a typo.
    Reject,
}

/// One document being read: reports go to the shared [`Report`] under the document's label.
pub(super) struct Doc<'r> {
    pub label: String,
    unknown_fields: UnknownFields,
    report: &'r mut Report,
}

/// The path of `key` inside the object at `path`; keys with dots or slashes (label names such
/// as `topology.kubernetes.io/region`) are quoted so the path stays readable.
pub(super) fn field(path: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match (path.is_empty(), plain) {
        (true, true) => key.to_string(),
        (true, false) => format!("[{key:?}]"),
        (false, true) => format!("{path}.{key}"),
        (false, false) => format!("{path}[{key:?}]"),
    }
}

/// The path of item `i` of the list at `path`.
pub(super) fn item(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// A short description of a value for messages: `"soon"`, `10`, `a list`.
pub(super) fn describe(value: &Value) -> String {
    match value {
        Value::Null => "empty".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "a mapping".to_string(),
    }
}

impl<'r> Doc<'r> {
    pub fn new(label: String, unknown_fields: UnknownFields, report: &'r mut Report) -> Self {
        Self {
            label,
            unknown_fields,
            report,
        }
    }

    pub fn error(&mut self, path: &str, reason: impl Display) {
        self.report.error(&self.label, path, reason);
    }

    pub fn warn(&mut self, path: &str, reason: impl Display) {
        self.report.warning(&self.label, path, reason);
    }

    /// A field lb understands but does not act on yet: said once, with what lb does instead.
    pub fn ignored(&mut self, path: &str, why: impl Display) {
        self.warn(path, format!("ignored, {why}"));
    }

    pub fn unknown_field(&mut self, path: &str) {
        match self.unknown_fields {
            UnknownFields::Warn => self.warn(path, "unknown field, ignored"),
            UnknownFields::Reject => self.error(path, "unknown field"),
        }
    }

    /// How many errors the whole configuration has so far (to tell whether reading a part
    /// found any).
    pub fn error_count(&self) -> usize {
        self.report.errors.len()
    }

    pub fn missing(&mut self, path: &str, why: impl Display) {
        self.error(path, format!("missing: {why}"));
    }

    // Typed reads. Each returns `None` for an empty value (YAML `key:` with nothing after it,
    // which Kubernetes also reads as "not set"), and `None` after reporting an error for a value
    // of the wrong kind, so one document can report all its problems at once.

    pub fn object<'v>(&mut self, path: &str, value: &'v Value) -> Option<&'v Map<String, Value>> {
        match value {
            Value::Null => None,
            Value::Object(map) => Some(map),
            other => {
                self.error(path, format!("must be a mapping, not {}", describe(other)));
                None
            }
        }
    }

    pub fn list<'v>(&mut self, path: &str, value: &'v Value) -> Option<&'v [Value]> {
        match value {
            Value::Null => None,
            Value::Array(items) => Some(items),
            other => {
                self.error(path, format!("must be a list, not {}", describe(other)));
                None
            }
        }
    }

    pub fn string(&mut self, path: &str, value: &Value) -> Option<String> {
        match value {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            other => {
                self.error(path, format!("must be a string, not {}", describe(other)));
                None
            }
        }
    }

    pub fn bool(&mut self, path: &str, value: &Value) -> Option<bool> {
        match value {
            Value::Null => None,
            Value::Bool(b) => Some(*b),
            other => {
                self.error(path, format!("{} is not true or false", describe(other)));
                None
            }
        }
    }

    pub fn u32(&mut self, path: &str, value: &Value) -> Option<u32> {
        self.integer_in(path, value, 0, u32::MAX.into())
            .and_then(|n| u32::try_from(n).ok())
    }

    /// A port number, 1-65535.
    pub fn port(&mut self, path: &str, value: &Value) -> Option<u16> {
        self.integer_in(path, value, 1, u16::MAX.into())
            .and_then(|n| u16::try_from(n).ok())
    }

    /// A percentage, 0-100.
    pub fn percent(&mut self, path: &str, value: &Value) -> Option<u32> {
        self.integer_in(path, value, 0, 100)
            .and_then(|n| u32::try_from(n).ok())
    }

    pub fn integer_in(&mut self, path: &str, value: &Value, min: u64, max: u64) -> Option<u64> {
        let n = match value {
            Value::Null => return None,
            Value::Number(n) => n.as_u64(),
            _ => None,
        };
        match n {
            Some(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.error(
                    path,
                    format!("{} is not a whole number {min}-{max}", describe(value)),
                );
                None
            }
        }
    }

    pub fn string_list(&mut self, path: &str, value: &Value) -> Option<Vec<String>> {
        let items = self.list(path, value)?;
        let mut out = Vec::with_capacity(items.len());
        for (i, v) in items.iter().enumerate() {
            let at = item(path, i);
            match v {
                Value::String(s) => out.push(s.clone()),
                other => self.error(&at, format!("must be a string, not {}", describe(other))),
            }
        }
        Some(out)
    }

    /// A map of strings to strings (labels). Values must be strings, as Kubernetes requires:
    /// `version: 1` is a number in YAML and is refused there too.
    pub fn string_map(&mut self, path: &str, value: &Value) -> Option<BTreeMap<String, String>> {
        let map = self.object(path, value)?;
        let mut out = BTreeMap::new();
        for (k, v) in map {
            let at = field(path, k);
            match v {
                Value::String(s) => {
                    out.insert(k.clone(), s.clone());
                }
                other => self.error(
                    &at,
                    format!("must be a string (quote it), not {}", describe(other)),
                ),
            }
        }
        Some(out)
    }

    /// A duration as Istio reads it (`1s`, `1.5s`, `500ms`, `10m`), held to Istio's validation:
    /// at least 1ms, in whole milliseconds.
    pub fn istio_duration(&mut self, path: &str, value: &Value) -> Option<Duration> {
        let text = match value {
            Value::Null => return None,
            Value::String(s) => s,
            Value::Number(_) => {
                self.error(
                    path,
                    format!(
                        "{} is not a duration: give a unit, e.g. \"{}s\"",
                        describe(value),
                        value
                    ),
                );
                return None;
            }
            other => {
                self.error(path, format!("{} is not a duration", describe(other)));
                return None;
            }
        };
        let d = match parse_go_duration(text) {
            Ok(d) => d,
            Err(DurationError::Negative) => {
                self.error(path, format!("{text:?} is negative"));
                return None;
            }
            Err(DurationError::TooLong) => {
                self.error(path, format!("{text:?} is too long"));
                return None;
            }
            Err(DurationError::Invalid) => {
                self.error(
                    path,
                    format!("{text:?} is not a duration (e.g. 1s, 1.5s, 500ms, 10m, 1h)"),
                );
                return None;
            }
        };
        if d < Duration::from_millis(1) {
            self.error(
                path,
                format!("{text:?} is shorter than Istio's minimum of 1ms"),
            );
            return None;
        }
        if d.subsec_nanos() % 1_000_000 != 0 {
            self.error(
                path,
                format!("{text:?}: Istio takes durations in whole milliseconds"),
            );
            return None;
        }
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_quote_keys_that_are_not_plain_names() {
        assert_eq!(field("", "spec"), "spec");
        assert_eq!(field("spec", "hosts"), "spec.hosts");
        assert_eq!(
            field("spec.labels", "topology.kubernetes.io/region"),
            r#"spec.labels["topology.kubernetes.io/region"]"#
        );
        assert_eq!(item("spec.ports", 2), "spec.ports[2]");
    }

    #[test]
    fn typed_reads_report_the_path_and_the_value() {
        let mut report = Report::default();
        let mut doc = Doc::new("f document 1".into(), UnknownFields::Warn, &mut report);
        assert_eq!(doc.port("p", &Value::from(0)), None);
        assert_eq!(doc.port("p", &Value::from(80)), Some(80));
        assert_eq!(doc.percent("q", &Value::from(101)), None);
        assert_eq!(doc.u32("n", &Value::from(-1)), None);
        assert_eq!(doc.u32("n", &Value::from(1.5)), None);
        assert_eq!(doc.bool("b", &Value::from("yes please")), None);
        assert_eq!(doc.string("s", &Value::Null), None);
        assert_eq!(
            doc.istio_duration("d", &Value::from("1.5s")),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(doc.istio_duration("d", &Value::from("100us")), None);
        assert_eq!(doc.istio_duration("d", &Value::from("1500us")), None);
        assert_eq!(doc.istio_duration("d", &Value::from(10)), None);
        doc.unknown_field("spec.extra");
        assert_eq!(
            report.errors,
            [
                "f document 1: p: 0 is not a whole number 1-65535",
                "f document 1: q: 101 is not a whole number 0-100",
                "f document 1: n: -1 is not a whole number 0-4294967295",
                "f document 1: n: 1.5 is not a whole number 0-4294967295",
                r#"f document 1: b: "yes please" is not true or false"#,
                r#"f document 1: d: "100us" is shorter than Istio's minimum of 1ms"#,
                r#"f document 1: d: "1500us": Istio takes durations in whole milliseconds"#,
                r#"f document 1: d: 10 is not a duration: give a unit, e.g. "10s""#,
            ]
        );
        assert_eq!(
            report.warnings,
            ["f document 1: spec.extra: unknown field, ignored"]
        );
    }

    #[test]
    fn several_errors_are_listed_one_a_line() {
        let one = InvalidConfig {
            errors: vec!["a: x: bad".into()],
            warnings: vec![],
        };
        assert_eq!(one.to_string(), "a: x: bad");
        let two = InvalidConfig {
            errors: vec!["a: x: bad".into(), "b: y: worse".into()],
            warnings: vec![],
        };
        assert_eq!(
            two.to_string(),
            "2 errors in the configuration:\n  a: x: bad\n  b: y: worse"
        );
    }
}
