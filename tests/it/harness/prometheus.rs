//! Reading `/metrics`: the Prometheus text exposition format, parsed strictly enough that a
//! malformed line fails the test instead of being skipped.

use std::collections::BTreeMap;

/// One sample line: `name{label="value",...} value`.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the text exposition format strictly enough to catch a malformed line: HELP and TYPE
/// comments naming a valid metric (TYPE once per family, before its samples), and samples
/// `name{label="value",...} <float>`, each of a family with a TYPE.
pub fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let (keyword, name, rest) = (parts.next(), parts.next(), parts.next());
            let name = name.filter(|n| is_metric_name(n)).unwrap_or_else(|| panic!("bad comment {line:?}"));
            match keyword {
                Some("HELP") => assert!(rest.is_some_and(|h| !h.trim().is_empty()), "empty HELP {line:?}"),
                Some("TYPE") => {
                    let kind = rest.unwrap_or_default();
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "bad TYPE {line:?}"
                    );
                    let before = types.insert(name.to_string(), kind.to_string());
                    assert!(before.is_none(), "second TYPE for {name}");
                }
                _ => panic!("unknown comment {line:?}"),
            }
            continue;
        }
        assert!(!line.trim().is_empty(), "blank line in the exposition");
        let sample = parse_sample(line).unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                sample.name.strip_suffix(suffix).filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(&sample.name);
        assert!(types.contains_key(family), "{line:?} has no TYPE before it");
        if types[family] == "counter" {
            assert!(sample.value >= 0.0, "negative counter {line:?}");
        }
        samples.push(sample);
    }
    samples
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
        None => (series, BTreeMap::new()),
    };
    is_metric_name(name).then(|| Sample { name: name.to_string(), labels, value })
}

/// `a="1",b="2"`; values here never hold quotes or commas, so no escapes are handled.
fn parse_labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=')?;
        let value = value.strip_prefix('"')?.strip_suffix('"')?;
        let valid = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid || labels.insert(key.to_string(), value.to_string()).is_some() {
            return None;
        }
    }
    Some(labels)
}

fn is_metric_name(name: &str) -> bool {
    name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}
