//! The built-in detectors. Each is a candidate pattern, compiled once per process, and a
//! validation every candidate must pass: boundaries (a match never starts or ends inside a
//! word or a longer number), then the kind's checksum, ranges or shape.
//!
//! Patterns use ASCII classes only (`[0-9]`, never Unicode `\d`), so a non-ASCII digit never
//! becomes part of a number.

use std::sync::LazyLock;

use regex::Regex;

use super::{Builtin, checks};

/// A byte range `start..end` of the scanned text.
pub type Span = (usize, usize);

/// What the detectors' patterns need at the least, counted once per scanned text: a text
/// short of a kind's minimum cannot hold a match, and skips that kind's searches.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// ASCII digits anywhere in the text.
    digits: usize,
    /// Whether the text holds an `@`.
    at: bool,
    /// Length in bytes.
    len: usize,
}

impl Shape {
    /// A shape every kind may hold: searching with it is searching without the shortcut.
    #[cfg(test)]
    pub const ANY: Shape = Shape {
        digits: usize::MAX,
        at: true,
        len: usize::MAX,
    };

    /// The shape of `text` (one pass over its bytes).
    pub fn of(text: &str) -> Shape {
        let t = text.as_bytes();
        Shape {
            digits: t.iter().filter(|b| b.is_ascii_digit()).count(),
            at: t.contains(&b'@'),
            len: t.len(),
        }
    }

    /// Whether a text of this shape can hold a span of `kind`. The minimums are the patterns'
    /// own (see each pattern and its check below): an e-mail address has an `@`; every phone
    /// form has at least 8 digits (international 8–15, NANP 10, a labelled national number
    /// 9–12); an SSN 9 (`SSN`, `SSN_CONTEXT`); a card candidate 12 (three groups of four); an
    /// IBAN 2 digits in at least 15 bytes; an API key at least 15 bytes (`xoxb-` + 10; a
    /// secret assignment is longer); an IPv4 address 4 digits.
    pub fn may_hold(&self, kind: Builtin) -> bool {
        match kind {
            Builtin::Email => self.at,
            Builtin::Phone => self.digits >= 8,
            Builtin::Ssn => self.digits >= 9,
            Builtin::Card => self.digits >= 12,
            Builtin::Iban => self.digits >= 2 && self.len >= 15,
            Builtin::ApiKey => self.len >= 15,
            Builtin::Ipv4 => self.digits >= 4,
        }
    }
}

/// Appends the spans of `kind` found in `text` to `out` (sorted by start; one kind's spans
/// never overlap each other). `shape` is [`Shape::of`] `text`: a kind the text cannot hold is
/// not searched.
pub fn find(kind: Builtin, text: &str, shape: &Shape, out: &mut Vec<Span>) {
    if !shape.may_hold(kind) {
        return;
    }
    let t = text.as_bytes();
    match kind {
        Builtin::Email => collect(&EMAIL, text, out, |s, e| email_ok(t, s, e)),
        Builtin::Phone => {
            collect(&PHONE_INTL, text, out, |s, e| phone_intl_ok(t, s, e));
            collect(&PHONE_NANP, text, out, |s, e| phone_nanp_ok(t, s, e));
            for caps in PHONE_CONTEXT.captures_iter(text) {
                let m = caps.get(1).expect("group 1 always participates");
                if phone_national_ok(t, m.start(), m.end()) {
                    out.push((m.start(), m.end()));
                }
            }
            out.sort_unstable();
            dedup_overlapping(out);
        }
        Builtin::Ssn => {
            collect(&SSN, text, out, |s, e| ssn_ok(t, s, e));
            for caps in SSN_CONTEXT.captures_iter(text) {
                let m = caps.get(1).expect("group 1 always participates");
                if ssn_ok(t, m.start(), m.end()) {
                    out.push((m.start(), m.end()));
                }
            }
            out.sort_unstable();
            dedup_overlapping(out);
        }
        Builtin::Card => collect(&CARD, text, out, |s, e| card_ok(t, s, e)),
        Builtin::Iban => {
            for m in IBAN.find_iter(text) {
                if let Some(end) = iban_end(t, m.start(), m.end()) {
                    out.push((m.start(), end));
                }
            }
        }
        Builtin::ApiKey => {
            collect(&API_KEY, text, out, |s, e| api_key_ok(t, s, e));
            for caps in SECRET_ASSIGNMENT.captures_iter(text) {
                let m = caps.get(1).expect("group 1 always participates");
                let mut end = m.end();
                while end > m.start() && t[end - 1] == b'.' {
                    end -= 1;
                }
                if generic_secret_ok(&t[m.start()..end]) && !word_byte_at(t, end) {
                    out.push((m.start(), end));
                }
            }
            out.sort_unstable();
            dedup_overlapping(out);
        }
        Builtin::Ipv4 => collect(&IPV4, text, out, |s, e| ipv4_ok(t, s, e)),
    }
}

/// Appends to `out` the spans of `kind` that only the name of the field holding `value` reveals
/// (a JSON member or form field): a whole value that passes the generic secret test under a
/// credential-like name (`"password": "…"`), or nine bare digits under an SSN-like name.
pub fn find_in_field(kind: Builtin, field: &str, value: &str, out: &mut Vec<Span>) {
    let v = value.as_bytes();
    let whole = match kind {
        // The value's checks first: they are cheaper than the name's pattern.
        Builtin::ApiKey => {
            v.iter().all(|&b| is_secret_byte(b))
                && generic_secret_ok(v)
                && CREDENTIAL_NAME.is_match(field)
        }
        Builtin::Ssn => v.len() == 9 && ssn_ok(v, 0, 9) && SSN_NAME.is_match(field),
        _ => false,
    };
    if whole {
        out.push((0, v.len()));
    }
}

fn compile(pattern: &str) -> Regex {
    Regex::new(pattern).expect("built-in DLP pattern compiles")
}

fn collect(re: &Regex, text: &str, out: &mut Vec<Span>, ok: impl Fn(usize, usize) -> bool) {
    out.extend(
        re.find_iter(text)
            .map(|m| (m.start(), m.end()))
            .filter(|&(s, e)| ok(s, e)),
    );
}

/// Drops spans overlapping an earlier-starting (or, at equal start, longer) one; `spans` must be
/// sorted.
fn dedup_overlapping(spans: &mut Vec<Span>) {
    spans.sort_by_key(|&(s, e)| (s, std::cmp::Reverse(e)));
    let mut last_end = 0;
    spans.retain(|&(s, e)| {
        let keep = s >= last_end;
        if keep {
            last_end = e;
        }
        keep
    });
}

// --- boundaries ---

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn word_byte_at(t: &[u8], i: usize) -> bool {
    t.get(i).is_some_and(|&b| is_word(b))
}

/// Whether `t[start..end]` stands alone: the bytes on both sides are not word bytes, and not
/// one of `seps` continuing a number (`5.` before, `-7` after), so a match never cuts a longer
/// number such as `1.2.3.4.5` or `12-123-45-6789`.
fn isolated(t: &[u8], start: usize, end: usize, seps: &[u8]) -> bool {
    let before = start.checked_sub(1).map(|i| t[i]);
    let before2 = start.checked_sub(2).map(|i| t[i]);
    let after = t.get(end).copied();
    let after2 = t.get(end + 1).copied();
    let glued = |b: Option<u8>, next: Option<u8>| match b {
        Some(b) if is_word(b) => true,
        Some(b) if seps.contains(&b) => next.is_some_and(|n| n.is_ascii_digit()),
        _ => false,
    };
    !glued(before, before2) && !glued(after, after2)
}

fn digits_of(s: &[u8]) -> Vec<u8> {
    s.iter().copied().filter(u8::is_ascii_digit).collect()
}

// --- email ---

/// A practical subset of the RFC 5322 `addr-spec` (the dot-atom form the WHATWG HTML "valid
/// e-mail address" production also uses), without the local-part characters that delimit
/// text in practice (`= & / ? ' !`…), and with a DNS domain (RFC 1035 labels) ending in an
/// alphabetic top-level label.
static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    compile(
        r"[A-Za-z0-9_%+-][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}",
    )
});

/// "Top-level labels" that are file extensions: `logo@2x.png` is an asset name, not an address.
const ASSET_EXTENSIONS: &[&str] = &[
    "png", "jpg", "jpeg", "gif", "svg", "webp", "ico", "bmp", "tif", "tiff", "css", "js", "map",
    "json", "pdf", "mp4",
];

fn email_ok(t: &[u8], start: usize, end: usize) -> bool {
    if t.get(end)
        .is_some_and(|&b| is_word(b) || b == b'@' || b == b'-')
    {
        return false;
    }
    let tld_start = t[start..end]
        .iter()
        .rposition(|&b| b == b'.')
        .map_or(start, |i| start + i + 1);
    let tld = std::str::from_utf8(&t[tld_start..end]).unwrap_or_default();
    !ASSET_EXTENSIONS
        .iter()
        .any(|ext| ext.eq_ignore_ascii_case(tld))
}

// --- phone ---

/// `+` country code and subscriber number (ITU-T E.164), contiguous or in groups separated by
/// one space, dot or dash, with optional parenthesised groups (`+44 (0)20 7946 0958`).
static PHONE_INTL: LazyLock<Regex> =
    LazyLock::new(|| compile(r"\+[0-9]+(?:(?:[ .-]|[ .-]?\([0-9]{1,4}\)[ .-]?)[0-9]+)*"));

/// NANP numbers written with separators: `(415) 555-2671`, `415-555-2671`, `415.555.2671`,
/// `415 555 2671`, `1-415-555-2671`. A bare 10-digit run is not matched: without `+1` or
/// separators it is as likely an order or account number.
static PHONE_NANP: LazyLock<Regex> = LazyLock::new(|| {
    compile(r"(?:1[ .-])?(?:\([2-9][0-9]{2}\)[ .-]?|[2-9][0-9]{2}[ .-])[2-9][0-9]{2}[ .-][0-9]{4}")
});

/// A national number (trunk prefix `0`, as most countries outside the NANP write them:
/// `020 7946 0958`, `030-1234567`, `06 12 34 56 78`), accepted only right after a phone label
/// (`tel:`, `phone`, `mobile`, `call me at`…): without `+` or a label it is indistinguishable
/// from any other grouped number.
static PHONE_CONTEXT: LazyLock<Regex> = LazyLock::new(|| {
    compile(
        r"(?i)\b(?:tel|telephone|phone|mobile|cell|fax|whatsapp|call(?: me)?(?: at| on)?)\.?\s*[:#]?\s*(0[0-9]{1,4}(?:[ .-]?[0-9]{2,4}){1,4})",
    )
});

fn phone_national_ok(t: &[u8], start: usize, end: usize) -> bool {
    isolated(t, start, end, b".-") && (9..=12).contains(&digits_of(&t[start..end]).len())
}

/// NANP numbering plan: area code and central-office code are `NXX` (N = 2–9); the area code is
/// not an `N11` service code.
fn nanp_valid(national: &[u8]) -> bool {
    national.len() == 10
        && (b'2'..=b'9').contains(&national[0])
        && national[1..3] != *b"11"
        && (b'2'..=b'9').contains(&national[3])
}

fn phone_intl_ok(t: &[u8], start: usize, end: usize) -> bool {
    if start > 0 && is_word(t[start - 1]) || t.get(end).is_some_and(|&b| is_word(b) || b == b'%') {
        return false;
    }
    let digits = digits_of(&t[start..end]);
    if !(8..=15).contains(&digits.len()) || digits[0] == b'0' {
        return false;
    }
    // Country code 1 is the NANP: exactly ten national digits, following its plan.
    digits[0] != b'1' || nanp_valid(&digits[1..])
}

fn phone_nanp_ok(t: &[u8], start: usize, end: usize) -> bool {
    if !isolated(t, start, end, b".-") || start > 0 && t[start - 1] == b'+' {
        return false;
    }
    let digits = digits_of(&t[start..end]);
    let national = if digits.len() == 11 {
        &digits[1..]
    } else {
        &digits[..]
    };
    nanp_valid(national)
}

// --- ssn ---

/// `AAA-GG-SSSS` or `AAA GG SSSS`.
static SSN: LazyLock<Regex> =
    LazyLock::new(|| compile(r"[0-9]{3}-[0-9]{2}-[0-9]{4}|[0-9]{3} [0-9]{2} [0-9]{4}"));

/// Nine bare digits, accepted only right after an SSN label (`SSN: 123456789`).
static SSN_CONTEXT: LazyLock<Regex> = LazyLock::new(|| {
    compile(
        r#"(?i)\b(?:ssn|social[ _-]security(?:[ _-](?:number|no))?)["']?\s*(?:#|no\.?|number)?\s*[:=]?\s*["']?([0-9]{9})"#,
    )
});

/// A field name that labels an SSN (`ssn`, `customer_ssn`, `socialSecurityNumber`).
static SSN_NAME: LazyLock<Regex> =
    LazyLock::new(|| compile(r"(?i)(?:^|[^a-z])ssn(?:$|[^a-z])|social[ _-]?security"));

fn ssn_ok(t: &[u8], start: usize, end: usize) -> bool {
    if !isolated(t, start, end, b".-") {
        return false;
    }
    let d = digits_of(&t[start..end]);
    let num = |r: std::ops::Range<usize>| {
        d[r].iter()
            .fold(0u16, |acc, &b| acc * 10 + u16::from(b - b'0'))
    };
    d.len() == 9 && checks::ssn_valid(num(0..3), num(3..5) as u8, num(5..9))
}

// --- card ---

/// 13–19 digits, contiguous or grouped by spaces or dashes as cards print them (4-4-4-4[-1..3],
/// 4-6-4/5).
static CARD: LazyLock<Regex> = LazyLock::new(|| {
    compile(
        r"[0-9]{13,19}|[0-9]{4}(?: [0-9]{4}){2,3}(?: [0-9]{1,3})?|[0-9]{4}(?:-[0-9]{4}){2,3}(?:-[0-9]{1,3})?|[0-9]{4}[ -][0-9]{6}[ -][0-9]{4,5}",
    )
});

fn card_ok(t: &[u8], start: usize, end: usize) -> bool {
    if !isolated(t, start, end, b".-") || follows_iban_head(t, start) {
        return false;
    }
    let d = digits_of(&t[start..end]);
    (13..=19).contains(&d.len()) && checks::card_network(&d).is_some() && checks::luhn_valid(&d)
}

/// Whether `t[..start]` ends with an IBAN's country code and check digits and a space
/// (`DE89 `): the digits that follow are a BBAN (valid or not), not a card.
fn follows_iban_head(t: &[u8], start: usize) -> bool {
    start >= 5
        && matches!(&t[start - 5..start], [a, b, c, d, b' ']
            if a.is_ascii_uppercase() && b.is_ascii_uppercase() && c.is_ascii_digit() && d.is_ascii_digit())
}

// --- iban ---

/// Country code, check digits, then BBAN characters, optionally in space-separated groups
/// (paper format). The exact end is found by [`iban_end`] from the country's registered length.
static IBAN: LazyLock<Regex> = LazyLock::new(|| compile(r"[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}"));

/// End of the IBAN starting at `start` (within the candidate `start..limit`): exactly the
/// country's registered number of characters (single spaces between them allowed), followed by
/// a non-word byte, with a valid mod-97 checksum.
fn iban_end(t: &[u8], start: usize, limit: usize) -> Option<usize> {
    if start > 0 && is_word(t[start - 1]) {
        return None;
    }
    let len = checks::iban_length(&t[start..start + 2])?;
    let mut compact = Vec::with_capacity(len);
    let mut i = start;
    while compact.len() < len && i < limit {
        if t[i] != b' ' {
            compact.push(t[i]);
        }
        i += 1;
    }
    (compact.len() == len && !word_byte_at(t, i) && checks::iban_checksum_valid(&compact))
        .then_some(i)
}

// --- api_key ---

/// Provider credentials by prefix and shape (each provider's documented key format):
/// Anthropic `sk-ant-…`; OpenAI `sk-…`, `sk-proj-…`, `sk-svcacct-…`, `sk-admin-…` (≥ 32
/// characters after the prefix); AWS access key IDs `AKIA`/`ASIA`/`ABIA`/`ACCA` + 16; GitHub
/// `ghp_`/`gho_`/`ghu_`/`ghs_`/`ghr_` + ≥ 36 and `github_pat_` 22 + `_` + 59; Slack
/// `xoxa-`/`xoxb-`/`xoxp-`/`xoxr-`; Stripe secret and restricted keys `sk_live_`/`rk_live_`
/// (and `_test_`); Google API keys `AIza` + 35.
static API_KEY: LazyLock<Regex> = LazyLock::new(|| {
    compile(concat!(
        r"sk-ant-[A-Za-z0-9_-]{32,}",
        r"|sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{32,}",
        r"|(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}",
        r"|gh[pousr]_[A-Za-z0-9]{36,251}",
        r"|github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59}",
        r"|xox[abpr]-[A-Za-z0-9-]{10,250}",
        r"|[rs]k_(?:live|test)_[A-Za-z0-9]{24,247}",
        r"|AIza[A-Za-z0-9_-]{35}",
    ))
});

/// A value assigned to a credential-like name: `api_key=…`, `"client_secret": "…"`,
/// `Authorization: Bearer …`, `GITHUB_TOKEN: …`. Group 1 is the value; it must then pass
/// [`generic_secret_ok`].
static SECRET_ASSIGNMENT: LazyLock<Regex> = LazyLock::new(|| {
    compile(
        r#"(?i)(?:api[_-]?key|secret|token|passw(?:or)?d|pwd|credential|private[_-]?key|access[_-]?key|auth[_-]?key|authorization|bearer)[A-Za-z0-9_.-]*["']?(?:\s*(?:[:=]|=>)\s*|\s+)["']?(?:bearer\s+)?([A-Za-z0-9+/_.~=-]{20,512})"#,
    )
});

/// A field name that labels a credential (`password`, `client_secret`, `apiKey`, `x-auth-token`).
static CREDENTIAL_NAME: LazyLock<Regex> = LazyLock::new(|| {
    compile(
        r"(?i)api[_-]?key|secret|token|passw(?:or)?d|pwd|credential|private[_-]?key|access[_-]?key|auth[_-]?key|authorization",
    )
});

/// The characters of a generic secret value (base64, base64url, hex, JWT, UUID alphabets).
fn is_secret_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"+/_.~=-".contains(&b)
}

/// Entropy floor (bits per character) for a hex-alphabet value: the `hex_limit` default of
/// Yelp's detect-secrets (`HexHighEntropyString`), as in truffleHog v2.
pub const HEX_ENTROPY_MIN: f64 = 3.0;

/// Upper bound of the entropy floor for other values: the `base64_limit` default of Yelp's
/// detect-secrets (`Base64HighEntropyString`), as in truffleHog v2.
pub const BASE64_ENTROPY_CAP: f64 = 4.5;

/// Entropy floor for a non-hex value of `len` characters: `min(0.8 · log2(len), 4.5)`.
///
/// A fixed 4.5 misses most short random tokens: the plug-in entropy of a random base62 string
/// is bounded by log2(len) while len is below the alphabet size (median 4.0 bits at 20
/// characters, 4.5 at 32). The floor therefore scales with log2(len) and sits below the
/// 0.1st percentile of random base62 strings at every length from 20 to 64 (checked by
/// `dlp::tests::entropy_floor_keeps_random_tokens`), while English identifiers and placeholders
/// (`your_api_key_goes_here`: 3.5 bits at 22 characters, floor 3.6) stay under it.
pub fn entropy_floor(len: usize) -> f64 {
    (0.8 * (len as f64).log2()).min(BASE64_ENTROPY_CAP)
}

/// The generic rule's test of a value: at least 20 characters, at least one digit and one
/// letter, and Shannon entropy at or above [`HEX_ENTROPY_MIN`] (hex values) or
/// [`entropy_floor`] (others).
pub fn generic_secret_ok(v: &[u8]) -> bool {
    if v.len() < 20 || !v.iter().any(u8::is_ascii_digit) || !v.iter().any(u8::is_ascii_alphabetic) {
        return false;
    }
    let h = checks::shannon_entropy(v);
    if v.iter().all(|&b| b.is_ascii_hexdigit() || b == b'-') {
        h >= HEX_ENTROPY_MIN
    } else {
        h >= entropy_floor(v.len())
    }
}

fn api_key_ok(t: &[u8], start: usize, end: usize) -> bool {
    let glued = |b: u8| is_word(b) || b == b'-';
    if start > 0 && glued(t[start - 1]) || t.get(end).is_some_and(|&b| glued(b)) {
        return false;
    }
    let key = &t[start..end];
    if key.starts_with(b"sk-") {
        // Random bodies mix classes; `sk-this-is-a-long-hyphenated-name` does not.
        let classes = [
            key[3..].iter().any(u8::is_ascii_uppercase),
            key[3..].iter().any(u8::is_ascii_lowercase),
            key[3..].iter().any(u8::is_ascii_digit),
        ];
        classes.iter().filter(|c| **c).count() >= 2 && key[3..].iter().any(u8::is_ascii_digit)
    } else if key.starts_with(b"xox") {
        key[5..].iter().any(u8::is_ascii_digit)
    } else {
        true
    }
}

// --- ipv4 ---

/// Dotted-quad IPv4 without leading zeros (RFC 791 notation as `inet_pton` accepts it).
static IPV4: LazyLock<Regex> = LazyLock::new(|| {
    compile(
        r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}",
    )
});

/// Words that make a following dotted quad a version number (`version 1.2.3.4`, `build:
/// 10.0.19041.1`).
const VERSION_WORDS: &[&str] = &[
    "version", "ver", "ver.", "v", "release", "build", "firmware",
];

fn ipv4_ok(t: &[u8], start: usize, end: usize) -> bool {
    if !isolated(t, start, end, b".") {
        return false;
    }
    let before = &t[start.saturating_sub(24)..start];
    let before = before.trim_ascii_end();
    let before = before
        .strip_suffix(b":")
        .or_else(|| before.strip_suffix(b"="))
        .unwrap_or(before)
        .trim_ascii_end();
    !VERSION_WORDS.iter().any(|w| {
        before.len() >= w.len()
            && before[before.len() - w.len()..].eq_ignore_ascii_case(w.as_bytes())
            && (before.len() == w.len() || !is_word(before[before.len() - w.len() - 1]))
    })
}
