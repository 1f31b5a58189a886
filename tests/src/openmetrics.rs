//! A strict parser of the OpenMetrics text exposition format 1.0.0 (the subset the agent's
//! `/metrics` emits: `# HELP`, `# TYPE`, `# UNIT` metadata, samples without timestamps or
//! exemplars, `# EOF`).
//!
//! Strict on purpose: any line it does not understand, a sample outside its declared family (or
//! with a suffix its type does not allow), a malformed label set or value, or a missing or early
//! `# EOF` is an error. The format: <https://github.com/prometheus/OpenMetrics/blob/main/specification/OpenMetrics.md>.

use std::collections::BTreeMap;

/// A metric family: its `# TYPE` and samples.
#[derive(Clone, Debug, Default)]
pub struct Family {
    /// `counter`, `gauge`, `histogram`, ...
    pub kind: String,
    pub unit: Option<String>,
    pub help: Option<String>,
    pub samples: Vec<Sample>,
}

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The full sample name (`aegis_l7_decisions_total`, `..._bucket`).
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition: families by name.
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    pub families: BTreeMap<String, Family>,
}

impl Exposition {
    /// Parses `text`.
    ///
    /// # Errors
    /// The first offending line, with its number.
    pub fn parse(text: &str) -> Result<Exposition, String> {
        let mut exp = Exposition::default();
        let mut eof = false;
        for (i, line) in text.split_terminator('\n').enumerate() {
            let at = |msg: String| format!("line {}: {msg}: {line:?}", i + 1);
            if eof {
                return Err(at("content after # EOF".into()));
            }
            if line == "# EOF" {
                eof = true;
            } else if let Some(meta) = line.strip_prefix("# ") {
                let mut parts = meta.splitn(3, ' ');
                let (Some(keyword), Some(name)) = (parts.next(), parts.next()) else {
                    return Err(at("incomplete metadata".into()));
                };
                check_name(name).map_err(&at)?;
                let rest = parts.next().unwrap_or("").to_owned();
                let family = exp.families.entry(name.to_owned()).or_default();
                match keyword {
                    "TYPE" => {
                        if !matches!(
                            rest.as_str(),
                            "counter"
                                | "gauge"
                                | "histogram"
                                | "gaugehistogram"
                                | "summary"
                                | "info"
                                | "stateset"
                                | "unknown"
                        ) {
                            return Err(at(format!("unknown type {rest:?}")));
                        }
                        family.kind = rest;
                    }
                    "HELP" => family.help = Some(rest),
                    "UNIT" => {
                        if !name.ends_with(&format!("_{rest}")) {
                            return Err(at(format!("family name does not end in its unit {rest}")));
                        }
                        family.unit = Some(rest);
                    }
                    other => return Err(at(format!("unknown metadata {other:?}"))),
                }
            } else {
                let sample = parse_sample(line).map_err(&at)?;
                let (family_name, family) = exp
                    .families
                    .iter_mut()
                    .filter(|(n, f)| {
                        sample_suffixes(&f.kind)
                            .iter()
                            .any(|s| sample.name == format!("{n}{s}"))
                    })
                    .max_by_key(|(n, _)| n.len())
                    .ok_or_else(|| at(format!("sample {} of no declared family", sample.name)))?;
                if family.kind.is_empty() {
                    return Err(at(format!("family {family_name} has no # TYPE")));
                }
                family.samples.push(sample);
            }
        }
        if !eof {
            return Err("no # EOF at the end".into());
        }
        Ok(exp)
    }

    /// Every sample named `name` whose labels include all of `labels`.
    pub fn samples<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.families
            .values()
            .flat_map(|f| &f.samples)
            .filter(move |s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
    }

    /// The value of the one sample named `name` with exactly the labels `labels`, if present.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples(name, labels)
            .find(|s| s.labels == want)
            .map(|s| s.value)
    }

    /// Every sample name the families' types allow (`x_total` and `x_created` of a counter
    /// `x`, `x_bucket`, `x_count`, `x_sum` of a histogram `x`, ...).
    pub fn sample_names(&self) -> Vec<String> {
        self.families
            .iter()
            .flat_map(|(n, f)| {
                sample_suffixes(&f.kind)
                    .iter()
                    .map(move |s| format!("{n}{s}"))
            })
            .collect()
    }
}

/// The sample name suffixes a family type allows.
fn sample_suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "counter" => &["_total", "_created"],
        "histogram" => &["_bucket", "_count", "_sum", "_created"],
        "gaugehistogram" => &["_bucket", "_gcount", "_gsum"],
        "summary" => &["", "_count", "_sum", "_created"],
        "info" => &["_info"],
        _ => &[""],
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        Ok(())
    } else {
        Err(format!("invalid metric name {name:?}"))
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or_else(|| "sample without a value".to_owned())?;
    let name = &line[..name_end];
    check_name(name)?;
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            if c == '}' {
                end = Some(i);
                break;
            }
            // label name
            let start = i;
            let mut name_end = None;
            if c == '=' {
                return Err("empty label name".into());
            }
            for (j, c) in chars.by_ref() {
                if c == '=' {
                    name_end = Some(j);
                    break;
                }
                if !(c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!("invalid character {c:?} in a label name"));
                }
            }
            let name_end = name_end.ok_or("label without `=`")?;
            let label = &body[start..name_end];
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {label} value not quoted"));
            }
            let mut value = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => return Err(format!("invalid escape \\{other:?}")),
                    },
                    '"' => {
                        closed = true;
                        break;
                    }
                    '\n' => return Err("newline in a label value".into()),
                    c => value.push(c),
                }
            }
            if !closed {
                return Err(format!("label {label} value not closed"));
            }
            if labels.insert(label.to_owned(), value).is_some() {
                return Err(format!("label {label} repeated"));
            }
            match chars.peek().map(|(_, c)| *c) {
                Some(',') => {
                    chars.next();
                }
                Some('}') => {}
                other => return Err(format!("expected `,` or `}}` after a label, got {other:?}")),
            }
        }
        let end = end.ok_or("label set not closed")?;
        rest = &body[end + 1..];
    }
    let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
    if value.contains(' ') {
        return Err("timestamps and exemplars are not expected".into());
    }
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse::<f64>().map_err(|e| format!("value {v:?}: {e}"))?,
    };
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP a_requests Requests.\n# TYPE a_requests counter\na_requests_total{agent=\"x\",reason=\"q\\\"uote\"} 3\n# TYPE a_latency_seconds histogram\n# UNIT a_latency_seconds seconds\na_latency_seconds_bucket{le=\"0.1\"} 1\na_latency_seconds_bucket{le=\"+Inf\"} 2\na_latency_seconds_sum 0.5\na_latency_seconds_count 2\n# TYPE a_pending gauge\na_pending 0\n# EOF\n";

    #[test]
    fn parses_families_samples_and_escapes() {
        let exp = Exposition::parse(TEXT).unwrap();
        assert_eq!(
            exp.value("a_requests_total", &[("agent", "x"), ("reason", "q\"uote")]),
            Some(3.0)
        );
        assert_eq!(exp.value("a_latency_seconds_count", &[]), Some(2.0));
        assert_eq!(exp.families["a_latency_seconds"].samples.len(), 4);
        assert_eq!(exp.value("a_pending", &[]), Some(0.0));
        assert!(
            exp.sample_names()
                .contains(&"a_latency_seconds_bucket".to_owned())
        );
    }

    #[test]
    fn rejects_what_it_does_not_understand() {
        for (bad, why) in [
            (TEXT.replace("# EOF\n", ""), "no # EOF"),
            (format!("{TEXT}a_pending 1\n"), "after # EOF"),
            (
                TEXT.replace("a_pending 0", "a_pendingx 0"),
                "no declared family",
            ),
            (
                TEXT.replace("a_requests_total{", "a_requests{"),
                "no declared family",
            ),
            (TEXT.replace("agent=\"x\"", "agent=x"), "not quoted"),
            (TEXT.replace("} 3", "} three"), "value"),
            (
                TEXT.replace(
                    "# UNIT a_latency_seconds seconds",
                    "# UNIT a_latency_seconds bytes",
                ),
                "unit",
            ),
            (
                TEXT.replace("# TYPE a_pending gauge", "# TYPE a_pending thing"),
                "unknown type",
            ),
        ] {
            let err = Exposition::parse(&bad).unwrap_err();
            assert!(err.contains(why), "{why}: {err}");
        }
    }
}
