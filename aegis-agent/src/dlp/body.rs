//! Body-level redaction: picks JSON, form or plain-text handling from the request's
//! `Content-Type`, redacts inside the decoded values, and re-encodes.
//!
//! Invariants: keys (JSON member names, form field names) are never rewritten; a body with no
//! finding is returned byte for byte as it came (a JSON body is re-serialized only when
//! something in it was redacted); a body that is not UTF-8 is never rewritten, and says so
//! ([`BodyFormat::Uninspected`]).

use std::fmt::Write as _;

use serde_json::Value;

use super::{Detectors, DlpError, Finding};

/// How a body was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFormat {
    /// `application/json`, `application/*+json`, `text/json`: string values were redacted.
    Json,
    /// `application/x-www-form-urlencoded`: field values were decoded, redacted, re-encoded.
    Form,
    /// Anything else that is UTF-8 (including no `Content-Type`, `text/*`, XML, multipart):
    /// redacted as one text.
    Text,
    /// Not UTF-8 (binary, compressed, another charset): returned unchanged, **not inspected**.
    /// The caller decides what an uninspectable body means under its policy.
    Uninspected,
}

/// One finding inside a body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldFinding {
    /// Where the redacted text was, as an RFC 6901 JSON Pointer into the decoded body: the
    /// string value for JSON (`/user/emails/0`), `/` + field name for a form (`/card_number`),
    /// `""` (the whole document) for plain text.
    pub path: String,
    /// Kind and byte offsets within the decoded value at `path`, before redaction.
    pub finding: Finding,
}

/// A body after redaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redacted {
    /// The body to forward: the input unchanged when there was no finding.
    pub body: Vec<u8>,
    /// Every finding, in document order (JSON: members in map order, array items in order).
    pub findings: Vec<FieldFinding>,
    pub format: BodyFormat,
}

impl Redacted {
    /// Whether the body was inspected at all (`false`: not UTF-8, passed through unchanged).
    pub fn inspected(&self) -> bool {
        self.format != BodyFormat::Uninspected
    }

    /// Whether anything was redacted.
    pub fn changed(&self) -> bool {
        !self.findings.is_empty()
    }
}

// === impl Detectors ===

impl Detectors {
    /// Redacts every string value inside `value`, recursively; member names are left alone.
    /// A value's member name (for array items, the nearest one) is its field context (see
    /// [`Detectors::redact_field`]).
    pub fn redact_json(&self, value: &mut Value) -> Vec<FieldFinding> {
        let mut findings = Vec::new();
        if !self.is_empty() {
            let mut path = String::new();
            self.walk_json(value, None, &mut path, &mut findings);
        }
        findings
    }

    fn walk_json(
        &self,
        value: &mut Value,
        field: Option<&str>,
        path: &mut String,
        out: &mut Vec<FieldFinding>,
    ) {
        let len = path.len();
        match value {
            Value::String(s) => {
                let (redacted, findings) = match field {
                    Some(field) => self.redact_field(field, s),
                    None => self.redact(s),
                };
                if !findings.is_empty() {
                    *s = redacted;
                    out.extend(findings.into_iter().map(|finding| FieldFinding {
                        path: path.clone(),
                        finding,
                    }));
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    write!(path, "/{i}").expect("writing to a String cannot fail");
                    self.walk_json(item, field, path, out);
                    path.truncate(len);
                }
            }
            Value::Object(members) => {
                for (name, member) in members.iter_mut() {
                    push_pointer_token(path, name);
                    self.walk_json(member, Some(name), path, out);
                    path.truncate(len);
                }
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }

    /// Redacts an `application/x-www-form-urlencoded` body: each field's value is decoded,
    /// redacted (with its field name as context) and re-encoded. Fields without a finding are
    /// kept byte for byte, so is their order; names are never changed.
    pub fn redact_form(&self, body: &str) -> (String, Vec<FieldFinding>) {
        let mut findings = Vec::new();
        if self.is_empty() {
            return (body.to_owned(), findings);
        }
        let mut out = String::with_capacity(body.len());
        for (i, pair) in body.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            let Some((name, value)) = form_urlencoded::parse(pair.as_bytes()).next() else {
                out.push_str(pair);
                continue;
            };
            let (redacted, found) = self.redact_field(&name, &value);
            if found.is_empty() {
                out.push_str(pair);
                continue;
            }
            let mut path = String::new();
            push_pointer_token(&mut path, &name);
            findings.extend(found.into_iter().map(|finding| FieldFinding {
                path: path.clone(),
                finding,
            }));
            out.push_str(
                &form_urlencoded::Serializer::new(String::new())
                    .append_pair(&name, &redacted)
                    .finish(),
            );
        }
        (out, findings)
    }

    /// Redacts a request body according to its `Content-Type` (parameters such as `charset`
    /// ignored; the body must be UTF-8 to be inspected). See [`BodyFormat`] for the choice.
    ///
    /// # Errors
    /// [`DlpError::Json`] when the body is declared JSON but does not parse: it cannot be
    /// redacted faithfully, and forwarding it unread would let malformed JSON carry data past
    /// the scanner.
    pub fn redact_body(
        &self,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Redacted, DlpError> {
        self.redact_body_parsed(content_type, body, None)
    }

    /// [`Detectors::redact_body`] of a body the caller has parsed already: `parsed`, when
    /// `Some`, must be `serde_json::from_slice(body)`; it is used (and redacted in place)
    /// instead of parsing the body again when the content type is JSON, and ignored otherwise.
    ///
    /// # Errors
    /// As [`Detectors::redact_body`].
    pub fn redact_body_parsed(
        &self,
        content_type: Option<&str>,
        body: &[u8],
        parsed: Option<Value>,
    ) -> Result<Redacted, DlpError> {
        let Ok(text) = std::str::from_utf8(body) else {
            return Ok(Redacted {
                body: body.to_vec(),
                findings: Vec::new(),
                format: BodyFormat::Uninspected,
            });
        };
        let media_type = content_type
            .and_then(|ct| ct.split(';').next())
            .map(|mt| mt.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let is_json = media_type == "application/json"
            || media_type == "text/json"
            || media_type.starts_with("application/") && media_type.ends_with("+json");
        if is_json {
            let mut value: Value = match parsed {
                Some(value) => value,
                None => serde_json::from_str(text).map_err(|source| DlpError::Json {
                    content_type: content_type.unwrap_or_default().to_owned(),
                    source,
                })?,
            };
            let findings = self.redact_json(&mut value);
            let body = if findings.is_empty() {
                body.to_vec()
            } else {
                serde_json::to_vec(&value).expect("a serde_json::Value always serializes")
            };
            return Ok(Redacted {
                body,
                findings,
                format: BodyFormat::Json,
            });
        }
        if media_type == "application/x-www-form-urlencoded" {
            let (redacted, findings) = self.redact_form(text);
            return Ok(Redacted {
                body: redacted.into_bytes(),
                findings,
                format: BodyFormat::Form,
            });
        }
        let (redacted, findings) = self.redact(text);
        Ok(Redacted {
            body: redacted.into_bytes(),
            findings: findings
                .into_iter()
                .map(|finding| FieldFinding {
                    path: String::new(),
                    finding,
                })
                .collect(),
            format: BodyFormat::Text,
        })
    }
}

/// Appends `/` and `token` escaped per RFC 6901 (`~` → `~0`, `/` → `~1`).
fn push_pointer_token(path: &mut String, token: &str) {
    path.push('/');
    for c in token.chars() {
        match c {
            '~' => path.push_str("~0"),
            '/' => path.push_str("~1"),
            c => path.push(c),
        }
    }
}
