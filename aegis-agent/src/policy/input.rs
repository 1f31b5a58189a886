//! Turns an [`L7Request`] into the Rego input document (shape in `docs/policy.md`).
//!
//! Parameters from the query string and the body (JSON or form) are flattened into one object
//! `params`: dotted path → list of every value found for it (repeated fields, array elements,
//! query and body alike), so a constraint checks every value the upstream might read. Parsing is
//! bounded (depth, count); a body that cannot be parsed becomes `body_error`, which denies any
//! action with parameter constraints (fail closed).

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    time::UNIX_EPOCH,
};

use regorus::Value;

use super::engine::L7Request;

/// Deepest JSON nesting parsed into parameters.
pub const MAX_DEPTH: usize = 32;
/// Most parameter values taken from one request.
pub const MAX_VALUES: usize = 4096;

/// Lowercase, without trailing dot or `:port`.
pub fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let host = match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    host.to_ascii_lowercase()
}

/// The path without query string or fragment, with percent-encoded unreserved characters
/// decoded. Refuses what an upstream could resolve to another path than the one matched: `.`
/// and `..` segments, encoded `/` or `\`, backslashes, and anything not starting with `/`.
pub fn normalize_path(path: &str) -> Result<String, &'static str> {
    let path = path.split(['?', '#']).next().unwrap_or("");
    if !path.starts_with('/') {
        return Err("path does not start with /");
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or("bad percent-encoding in path")?;
                match hex {
                    b'/' | b'\\' => return Err("encoded / or \\ in path"),
                    c if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') => {
                        out.push(c as char);
                    }
                    _ => out.push_str(&path[i..i + 3]),
                }
                i += 3;
            }
            b'\\' => return Err("backslash in path"),
            c if c.is_ascii_control() || c == b' ' => return Err("control character in path"),
            _ => {
                // Multi-byte UTF-8 is copied byte-wise through the char boundary below.
                let ch = path[i..].chars().next().unwrap_or('\u{fffd}');
                out.push(ch);
                i += ch.len_utf8();
                continue;
            }
        }
    }
    if out.split('/').any(|seg| seg == "." || seg == "..") {
        return Err("dot segment in path");
    }
    Ok(out)
}

/// The parameters of a request, and why the body could not be parsed, if it could not.
pub struct Params<'a> {
    /// The values of the parameters kept (see [`params`]), by name.
    pub values: BTreeMap<String, Vec<Value>>,
    /// Every kept name with a value at it or below it (`a.b.c` → `a`, `a.b`, `a.b.c`): what
    /// `required` checks.
    pub present: BTreeSet<String>,
    /// Every value, kept or not.
    pub count: usize,
    pub body_error: Option<String>,
    keep: Option<&'a HashSet<String>>,
}

impl Params<'_> {
    fn kept(&self, name: &str) -> bool {
        self.keep.is_none_or(|keep| keep.contains(name))
    }

    /// Counts one value of `key`, and keeps it (made by `value` only then) if its name is kept.
    fn push(&mut self, key: String, value: impl FnOnce() -> Value) -> Result<(), String> {
        if self.count >= MAX_VALUES {
            return Err(format!("more than {MAX_VALUES} parameter values"));
        }
        self.count += 1;
        let mut end = 0;
        for part in key.split('.') {
            end += part.len();
            let name = &key[..end];
            end += 1;
            if self.kept(name) && !self.present.contains(name) {
                self.present.insert(name.to_owned());
            }
        }
        if self.kept(&key) {
            self.values.entry(key).or_default().push(value());
        }
        Ok(())
    }
}

/// Whether parameters are read from a body of `content_type` as JSON: `application/json` and
/// `application/*+json` (RFC 6839 section 3.1).
pub fn is_json(content_type: Option<&str>) -> bool {
    let Some(mime) = content_type.and_then(|c| c.split(';').next()) else {
        return false;
    };
    let m = mime.trim().as_bytes();
    let (prefix, suffix) = (b"application/", b"+json");
    m.eq_ignore_ascii_case(b"application/json")
        || m.len() >= prefix.len() + suffix.len()
            && m[..prefix.len()].eq_ignore_ascii_case(prefix)
            && m[m.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
}

/// Parses the query string and the body into parameters. `json`: the body already parsed (see
/// [`super::L7Request::json`]). `keep`: the names whose values are kept (`None`: all); the
/// others are only counted (and their names' presence noted if kept), so a body's unchecked
/// fields (an LLM prompt, a message text) are never copied.
pub fn params<'a>(
    query: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
    json: Option<&serde_json::Value>,
    keep: Option<&'a HashSet<String>>,
) -> Params<'a> {
    let mut p = Params {
        values: BTreeMap::new(),
        present: BTreeSet::new(),
        count: 0,
        body_error: None,
        keep,
    };
    if let Some(q) = query
        && let Err(e) = form(&mut p, q.as_bytes())
    {
        p.body_error = Some(format!("query string: {e}"));
        return p;
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return p;
    }
    if is_json(content_type) {
        let result = match json {
            Some(value) => flatten(&mut p, String::new(), value, 0),
            None => parse_json(&mut p, body),
        };
        if let Err(e) = result {
            p.body_error = Some(e);
        }
        return p;
    }
    let mime = content_type
        .and_then(|c| c.split(';').next())
        .map(|c| c.trim().to_ascii_lowercase());
    let result = match mime.as_deref() {
        Some("application/x-www-form-urlencoded") => form(&mut p, body),
        Some(m) => Err(format!("content type {m} is not parsed for parameters")),
        None => Err("body without content type".to_owned()),
    };
    if let Err(e) = result {
        p.body_error = Some(e);
    }
    p
}

fn parse_json(p: &mut Params, body: &[u8]) -> Result<(), String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("malformed JSON body: {e}"))?;
    flatten(p, String::new(), &value, 0)
}

fn flatten(
    p: &mut Params,
    path: String,
    v: &serde_json::Value,
    depth: usize,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("JSON body nested deeper than {MAX_DEPTH}"));
    }
    match v {
        serde_json::Value::Object(map) => {
            for (k, child) in map {
                let key = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                flatten(p, key, child, depth + 1)?;
            }
            Ok(())
        }
        serde_json::Value::Array(items) => {
            for item in items {
                flatten(p, path.clone(), item, depth + 1)?;
            }
            Ok(())
        }
        // A scalar body (`"text"`, `42`) has no parameter name.
        _ if path.is_empty() => Ok(()),
        scalar => p.push(path, || Value::from(scalar.clone())),
    }
}

fn form(p: &mut Params, bytes: &[u8]) -> Result<(), String> {
    for (k, v) in form_urlencoded::parse(bytes) {
        let key = bracket_path(&k);
        if key.is_empty() {
            continue;
        }
        p.push(key, || Value::from(v.into_owned()))?;
    }
    Ok(())
}

/// `a[b][0][c]` → `a.b.c`; `a[]` → `a` (indexes and empty brackets name no field).
fn bracket_path(key: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    let (head, mut rest) = match key.find('[') {
        Some(i) => (&key[..i], &key[i..]),
        None => (key, ""),
    };
    parts.push(head);
    while let Some(inner) = rest.strip_prefix('[') {
        let Some(end) = inner.find(']') else {
            // Unbalanced: keep the remainder literally.
            parts.push(rest);
            break;
        };
        let seg = &inner[..end];
        if !seg.is_empty() && !seg.bytes().all(|b| b.is_ascii_digit()) {
            parts.push(seg);
        }
        rest = &inner[end + 1..];
    }
    parts.retain(|s| !s.is_empty());
    parts.join(".")
}

/// A parameter value as a number: numbers as they are; strings holding a plain decimal number
/// (`-?[0-9]{1,15}(\.[0-9]{1,15})?`: no exponent, sign `+`, spaces, `NaN` or `inf`) parsed;
/// `null` for anything else. What `min`, `max` and `approval_needed_over` compare.
pub fn number(v: &Value) -> Value {
    match v {
        Value::Number(_) => v.clone(),
        Value::String(s) if is_decimal(s) => s.parse::<f64>().map_or(Value::Null, Value::from),
        _ => Value::Null,
    }
}

fn is_decimal(s: &str) -> bool {
    let digits = |t: &str| (1..=15).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_digit());
    let s = s.strip_prefix('-').unwrap_or(s);
    match s.split_once('.') {
        Some((int, frac)) => digits(int) && digits(frac),
        None => digits(s),
    }
}

/// The input document for the request. `only`: the parameter names the policy's Rego reads
/// (`None`: all); `params`, `numbers` and `present` leave the others out, which spares copying
/// a body's unchecked fields (an LLM prompt, a message text) at all. Every value still counts
/// against [`MAX_VALUES`] and a body that does not parse still sets `body_error`.
pub fn build(req: &L7Request<'_>, host: &str, path: &str, only: Option<&HashSet<String>>) -> Value {
    let params = params(req.query, req.content_type, req.body, req.json, only);
    let present: BTreeMap<Value, Value> = params
        .present
        .iter()
        .map(|name| (Value::from(name.as_str()), Value::from(true)))
        .collect();
    let time_ns = req
        .time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    let mut object = BTreeMap::new();
    let mut put = |k: &str, v: Value| {
        object.insert(Value::from(k), v);
    };
    put("agent", Value::from(req.agent));
    put("tenant", Value::from(req.tenant));
    put("host", Value::from(host));
    put("method", Value::from(req.method));
    put("path", Value::from(path));
    // "/a/b/" → ["a", "b", ""]: what path patterns with `*` segments are matched against.
    let segments: Vec<Value> = path
        .strip_prefix('/')
        .unwrap_or(path)
        .split('/')
        .map(Value::from)
        .collect();
    put("segments", Value::from(segments));
    put("time_ns", Value::from(time_ns));
    let numbers: BTreeMap<Value, Value> = params
        .values
        .iter()
        .map(|(k, v)| {
            let n: Vec<Value> = v.iter().map(number).collect();
            (Value::from(k.as_str()), Value::from(n))
        })
        .collect();
    put("numbers", Value::from(numbers));
    let values: BTreeMap<Value, Value> = params
        .values
        .into_iter()
        .map(|(k, v)| (Value::from(k), Value::from(v)))
        .collect();
    put("params", Value::from(values));
    put("present", Value::from(present));
    if let Some(e) = params.body_error {
        put("body_error", Value::from(e));
    }
    Value::from(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattens_json_form_and_query() {
        let body = br#"{"amount": 5, "customer": {"address": {"city": "Paris"}}, "items": [{"price": 1}, {"price": "2"}]}"#;
        let ct = Some("application/json; charset=utf-8");
        let p = params(Some("amount=7&expand[]=customer"), ct, body, None, None);
        assert!(p.body_error.is_none());
        // A body the caller parsed already gives the same parameters.
        let parsed: serde_json::Value = serde_json::from_slice(body).unwrap();
        let again = params(
            Some("amount=7&expand[]=customer"),
            ct,
            body,
            Some(&parsed),
            None,
        );
        assert_eq!((&again.values, again.count), (&p.values, p.count));
        assert_eq!(
            p.values["amount"],
            vec![Value::from("7"), Value::from(5u64)]
        );
        assert_eq!(p.values["expand"], vec![Value::from("customer")]);
        assert_eq!(
            p.values["customer.address.city"],
            vec![Value::from("Paris")]
        );
        assert_eq!(p.values["items.price"].len(), 2);

        let p = params(
            None,
            Some("application/x-www-form-urlencoded"),
            b"amount=1200&metadata[order_id]=A+1&items[0][price]=3",
            None,
            None,
        );
        assert_eq!(p.values["metadata.order_id"], vec![Value::from("A 1")]);
        assert_eq!(p.values["items.price"], vec![Value::from("3")]);
    }

    #[test]
    fn json_content_types_are_recognised_whatever_their_case() {
        for ct in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/vnd.api+json",
            "application/merge-patch+JSON",
        ] {
            assert!(is_json(Some(ct)), "{ct}");
        }
        for ct in [
            "text/json",
            "application/jsonx",
            "json",
            "applicatioé/x+json",
            "",
        ] {
            assert!(!is_json(Some(ct)), "{ct}");
        }
        assert!(!is_json(None));
    }

    #[test]
    fn only_the_parameters_read_enter_the_document() {
        let req = |body: &'static [u8]| L7Request {
            agent: "a",
            tenant: "t",
            host: "h",
            method: "POST",
            path: "/p",
            query: Some("q=1"),
            content_type: Some("application/json"),
            body,
            json: None,
            time: UNIX_EPOCH,
        };
        let only: std::collections::HashSet<String> = ["amount".to_owned()].into();
        let doc = build(
            &req(br#"{"amount": 5, "prompt": "a long text"}"#),
            "h",
            "/p",
            Some(&only),
        );
        let keys = |field: &str| -> Vec<Value> {
            doc[field].as_object().unwrap().keys().cloned().collect()
        };
        assert_eq!(keys("params"), vec![Value::from("amount")]);
        assert_eq!(keys("numbers"), vec![Value::from("amount")]);
        let every = build(&req(br#"{"amount": 5, "prompt": "x"}"#), "h", "/p", None);
        assert_eq!(every["params"].as_object().unwrap().len(), 3);
        // A body that does not parse is still reported, filter or not.
        let bad = build(&req(b"{not json"), "h", "/p", Some(&only));
        assert!(matches!(&bad["body_error"], Value::String(_)));
    }

    #[test]
    fn numbers_are_plain_decimals_only() {
        for (v, n) in [
            (Value::from("5000"), Value::from(5000.0)),
            (Value::from("-1.5"), Value::from(-1.5)),
            (Value::from(42u64), Value::from(42u64)),
            (
                Value::from("123456789012345"),
                Value::from(123456789012345.0),
            ),
        ] {
            assert_eq!(number(&v), n, "{v}");
        }
        for v in [
            "NaN",
            "inf",
            "1e5",
            "+5",
            " 5",
            "5.",
            ".5",
            "0x10",
            "1234567890123456",
            "",
            "-",
        ] {
            assert_eq!(number(&Value::from(v)), Value::Null, "{v:?}");
        }
        assert_eq!(number(&Value::from(true)), Value::Null);
    }

    #[test]
    fn unparsable_bodies_are_reported() {
        let p = params(None, Some("application/json"), b"{\"amount\": ", None, None);
        assert!(p.body_error.unwrap().contains("malformed JSON"));
        let p = params(None, Some("text/plain"), b"hello", None, None);
        assert!(p.body_error.unwrap().contains("text/plain"));
        let p = params(None, None, b"  ", None, None);
        assert!(p.body_error.is_none());
        let deep = "[".repeat(40) + &"]".repeat(40);
        let p = params(None, Some("application/json"), deep.as_bytes(), None, None);
        assert!(p.body_error.unwrap().contains("deeper"));
    }

    #[test]
    fn paths_that_could_resolve_elsewhere_are_refused() {
        assert_eq!(
            normalize_path("/v1/pay%5Fintents?x=1").unwrap(),
            "/v1/pay_intents"
        );
        assert_eq!(normalize_path("/a%20b").unwrap(), "/a%20b");
        for bad in [
            "/v1/../admin",
            "/v1/%2e%2e/admin",
            "/a%2fb",
            "/a\\b",
            "v1",
            "/a/./b",
        ] {
            assert!(normalize_path(bad).is_err(), "{bad}");
        }
        assert_eq!(normalize_host("API.Stripe.com.:443"), "api.stripe.com");
    }
}
