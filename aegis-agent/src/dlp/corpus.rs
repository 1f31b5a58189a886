//! A seeded generator of labelled snippets for measuring the detectors (`dlp::eval`): realistic
//! sentences holding true instances of every built-in kind, and hard negatives — strings that
//! look like a kind but are not one (bad checksums, never-issued SSN ranges, version numbers,
//! asset names, placeholders after `api_key=`…).
//!
//! Invariants: the same seed gives the same corpus on every platform (our own SplitMix64, no
//! dependency whose algorithm could change); a label is exactly the span a correct detector
//! must report; templates and hard negatives hold nothing any detector should report.

/// The base62 alphabet (random tokens).
pub const BASE62: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const HEX: &str = "0123456789abcdef";
const UPPER_DIGITS: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
const BASE64URL: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and fixed forever.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi` (the modulo bias is irrelevant at these ranges).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// `true` with probability `percent`/100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.range(0, 99) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.range(0, items.len() as u64 - 1) as usize]
    }

    pub fn string(&mut self, alphabet: &str, len: usize) -> String {
        let a = alphabet.as_bytes();
        (0..len).map(|_| char::from(*self.pick(a))).collect()
    }

    fn digits(&mut self, len: usize) -> String {
        self.string("0123456789", len)
    }
}

/// One labelled span of a sample.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Label {
    pub kind: &'static str,
    pub start: usize,
    pub end: usize,
}

/// A snippet and the spans a correct detector reports in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub text: String,
    pub labels: Vec<Label>,
}

/// A generated instance: `secret` is the labelled span (absent for a hard negative), inside
/// kind-specific context (`Authorization: Bearer ` … ).
struct Piece {
    before: String,
    secret: Option<(&'static str, String)>,
    after: String,
}

impl Piece {
    fn positive(kind: &'static str, secret: String) -> Piece {
        Piece::around("", kind, secret, "")
    }

    fn around(before: &str, kind: &'static str, secret: String, after: &str) -> Piece {
        Piece {
            before: before.to_owned(),
            secret: Some((kind, secret)),
            after: after.to_owned(),
        }
    }

    fn negative(text: String) -> Piece {
        Piece {
            before: text,
            secret: None,
            after: String::new(),
        }
    }
}

/// Sentences an agent might send; `{}` is where pieces go. None holds anything detectable.
const TEMPLATES: &[&str] = &[
    "Please update the customer record with {}.",
    "Agent note: {} (checked by the onboarding agent)",
    "Hi team, the value is {} - let me know if that looks wrong.",
    "{}",
    "Ticket #4521: user reported {} in the signup form.",
    "Slack message from planner-agent: {}",
    "Summary for 2024-03-18: {} and nothing else changed.",
    "{\"note\": \"{}\", \"priority\": 2}",
    "Customer said: \"you can use {} for this\"",
    "Reminder\n- item: {}\n- status: open",
    "Draft ad copy v3: Great deals! {} Offer ends Sunday.",
    "Step 4 of 7 completed; output was {}; moving to step 5.",
];

const FIRST: &[&str] = &[
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory",
    "oscar", "peggy", "trent", "victor", "walter", "Maria", "Jose", "Wei", "Aisha",
];
const LAST: &[&str] = &[
    "smith", "johnson", "lee", "garcia", "nguyen", "mueller", "rossi", "tanaka", "okafor", "kim",
];
const DOMAINS: &[&str] = &[
    "example.com",
    "mail.example.org",
    "corp-mail.io",
    "uni.example.ac.uk",
    "example.de",
    "startup.ai",
    "billing.example.co",
    "EXAMPLE.NET",
];

fn email(r: &mut Rng) -> Piece {
    let first = *r.pick(FIRST);
    let last = *r.pick(LAST);
    let local = match r.range(0, 4) {
        0 => format!("{first}.{last}"),
        1 => format!("{first}_{last}{}", r.range(1, 99)),
        2 => format!("{first}+{}", r.pick(&["news", "invoices", "agent"])),
        3 => first.to_owned(),
        _ => format!("{}{last}", &first[..1]),
    };
    Piece::positive("email", format!("{local}@{}", r.pick(DOMAINS)))
}

fn email_negative(r: &mut Rng) -> Piece {
    let first = *r.pick(FIRST);
    Piece::negative(match r.range(0, 6) {
        0 => format!("logo@{}x.png", r.range(2, 3)),
        1 => format!("avatar-{first}@2x.webp"),
        2 => format!("{first}@localhost"),
        3 => format!("@{first}"),
        4 => format!("{first} at example dot com"),
        5 => format!("npm i left-pad@1.{}.0", r.range(0, 9)),
        _ => format!("{first}@build-server"),
    })
}

/// A NANP number's ten digits: `NXX` area (not `N11`), `NXX` exchange, four digits.
fn nanp(r: &mut Rng) -> (String, String, String) {
    let area = loop {
        let a = format!("{}{}", r.range(2, 9), r.digits(2));
        if &a[1..] != "11" {
            break a;
        }
    };
    let exchange = format!("{}{}", r.range(2, 9), r.digits(2));
    (area, exchange, r.digits(4))
}

fn phone(r: &mut Rng) -> Piece {
    let (a, e, l) = nanp(r);
    let number = match r.range(0, 16) {
        0 => format!("({a}) {e}-{l}"),
        1 => format!("{a}-{e}-{l}"),
        2 => format!("{a}.{e}.{l}"),
        3 => format!("{a} {e} {l}"),
        4 => format!("+1 {a} {e} {l}"),
        5 => format!("+1 ({a}) {e}-{l}"),
        6 => format!("+1-{a}-{e}-{l}"),
        7 => format!("1-{a}-{e}-{l}"),
        8 => format!("+1{a}{e}{l}"),
        9 => format!("+44 20 {} {}", r.digits(4), r.digits(4)),
        10 => format!("+44 7{} {}", r.digits(3), r.digits(6)),
        11 => format!("+49 30 {}", r.digits(7)),
        12 => format!(
            "+33 {} {} {} {} {}",
            r.range(1, 9),
            r.digits(2),
            r.digits(2),
            r.digits(2),
            r.digits(2)
        ),
        13 => format!("+91 {}{} {}", r.range(6, 9), r.digits(4), r.digits(5)),
        14 => format!("+81-3-{}-{}", r.digits(4), r.digits(4)),
        15 => format!("+49151{}", r.digits(8)),
        // A national format without `+` (not detected by design: see docs/dlp.md).
        _ => format!("020 {} {}", r.digits(4), r.digits(4)),
    };
    let before = *r.pick(&["", "call me at ", "tel: ", "mobile "]);
    Piece::around(before, "phone", number, "")
}

fn phone_negative(r: &mut Rng) -> Piece {
    let (a, e, l) = nanp(r);
    Piece::negative(match r.range(0, 8) {
        0 => format!("order number {a}{e}{l}"),
        1 => format!("{} records processed", r.digits(11)),
        2 => format!("score +{} points", r.range(1, 99)),
        3 => format!(
            "version {}.{}.{}",
            r.range(1, 20),
            r.range(0, 40),
            r.range(0, 99)
        ),
        4 => format!(
            "ISBN 978-0-{}-{}-{}",
            r.digits(3),
            r.digits(5),
            r.range(0, 9)
        ),
        5 => format!("between 10:30-11:{}", r.range(10, 59)),
        6 => format!("timestamp 17{}", r.digits(8)),
        7 => format!("growth of +{}%", r.digits(8)),
        _ => format!("room {a}-B"),
    })
}

fn ssn_parts(r: &mut Rng) -> (u64, u64, u64) {
    let area = loop {
        let a = r.range(1, 899);
        if a != 666 {
            break a;
        }
    };
    (area, r.range(1, 99), r.range(1, 9999))
}

const SSN_LABELS: &[&str] = &["SSN: ", "ssn=", "social security number "];

fn ssn(r: &mut Rng) -> Piece {
    let (a, g, s) = ssn_parts(r);
    match r.range(0, 9) {
        0..=5 => Piece::positive("ssn", format!("{a:03}-{g:02}-{s:04}")),
        6 | 7 => Piece::around("SSN ", "ssn", format!("{a:03} {g:02} {s:04}"), ""),
        _ => {
            let label = *r.pick(SSN_LABELS);
            Piece::around(label, "ssn", format!("{a:03}{g:02}{s:04}"), "")
        }
    }
}

fn ssn_negative(r: &mut Rng) -> Piece {
    let (a, g, s) = ssn_parts(r);
    Piece::negative(match r.range(0, 6) {
        0 => format!("000-{g:02}-{s:04}"),
        1 => format!("666-{g:02}-{s:04}"),
        2 => format!("{}-{g:02}-{s:04}", r.range(900, 999)),
        3 => format!("{a:03}-00-{s:04}"),
        4 => format!("{a:03}-{g:02}-0000"),
        5 => format!("ticket {a:03}{g:02}{s:04}"),
        _ => format!("ZIP 9{}-{}", r.digits(4), r.digits(4)),
    })
}

/// The Luhn check digit completing `payload`.
fn luhn_digit(payload: &str) -> u32 {
    let sum: u32 = payload
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 0 {
                let d2 = d * 2;
                if d2 > 9 { d2 - 9 } else { d2 }
            } else {
                d
            }
        })
        .sum();
    (10 - sum % 10) % 10
}

/// A Luhn-valid number: `prefix`, random digits, check digit, `len` digits in all.
fn luhn_number(r: &mut Rng, prefix: &str, len: usize) -> String {
    let payload = format!("{prefix}{}", r.digits(len - 1 - prefix.len()));
    let check = luhn_digit(&payload);
    format!("{payload}{check}")
}

fn group(number: &str, sizes: &[usize], sep: &str) -> String {
    let mut parts = Vec::new();
    let mut at = 0;
    for &n in sizes {
        parts.push(&number[at..at + n]);
        at += n;
    }
    parts.join(sep)
}

fn card_number(r: &mut Rng) -> String {
    let (prefix, len) = match r.range(0, 8) {
        0 | 1 => ("4".to_owned(), 16),
        2 => (format!("5{}", r.range(1, 5)), 16),
        3 => (format!("{}", r.range(2221, 2720)), 16),
        4 => (r.pick(&["34", "37"]).to_string(), 15),
        5 => ("6011".to_owned(), 16),
        6 => (format!("{}", r.range(3528, 3589)), 16),
        7 => ("36".to_owned(), 14),
        _ => ("62".to_owned(), 16),
    };
    luhn_number(r, &prefix, len)
}

fn format_card(r: &mut Rng, n: &str) -> String {
    match (n.len(), r.range(0, 2)) {
        (16, 0) => group(n, &[4, 4, 4, 4], " "),
        (16, 1) => group(n, &[4, 4, 4, 4], "-"),
        (15, 0) => group(n, &[4, 6, 5], " "),
        _ => n.to_owned(),
    }
}

fn card(r: &mut Rng) -> Piece {
    let n = card_number(r);
    let text = format_card(r, &n);
    let (before, after) = *r.pick(&[
        ("", ""),
        ("card ", " exp 04/27"),
        ("pay with ", ""),
        ("cc=", ""),
    ]);
    Piece::around(before, "card", text, after)
}

fn card_negative(r: &mut Rng) -> Piece {
    let text = match r.range(0, 5) {
        0 | 1 => {
            // A card with a broken check digit.
            let n = card_number(r);
            let (body, last) = n.split_at(n.len() - 1);
            let last = (last.parse::<u32>().unwrap() + r.range(1, 9) as u32) % 10;
            format_card(r, &format!("{body}{last}"))
        }
        2 => {
            // Luhn-valid, but no network issues the prefix.
            let prefix = r.pick(&["1", "7", "9", "0"]).to_string();
            let n = luhn_number(r, &prefix, 16);
            format_card(r, &n)
        }
        3 => format!("order {}", r.digits(12)),
        // A random 16-digit identifier: ~4% pass Luhn with a card prefix (a false positive no
        // rule can avoid without context).
        4 => format!("tracking number {}", r.digits(16)),
        _ => format!("ref {}", r.digits(20)),
    };
    Piece::negative(text)
}

/// Countries and a BBAN shape each: `n` digit, `a` upper-case letter, `c` either.
const IBAN_SHAPES: &[(&str, &str)] = &[
    ("DE", "nnnnnnnnnnnnnnnnnn"),
    ("GB", "aaaannnnnnnnnnnnnn"),
    ("FR", "nnnnnnnnnnccccccccccc" /* + 2 below */),
    ("NL", "aaaannnnnnnnnn"),
    ("ES", "nnnnnnnnnnnnnnnnnnnn"),
    ("IT", "annnnnnnnnncccccccccccc"),
    ("BE", "nnnnnnnnnnnn"),
    ("CH", "nnnnncccccccccccc"),
    ("NO", "nnnnnnnnnnn"),
    ("PL", "nnnnnnnnnnnnnnnnnnnnnnnn"),
    ("SA", "nnnnnnnnnnnnnnnnnnnn"),
    ("BR", "nnnnnnnnnnnnnnnnnnnnnnnac"),
];

fn iban_compact(r: &mut Rng) -> String {
    let (country, shape) = *r.pick(IBAN_SHAPES);
    let mut bban: String = shape
        .chars()
        .map(|c| match c {
            'n' => r.string("0123456789", 1),
            'a' => r.string("ABCDEFGHIJKLMNOPQRSTUVWXYZ", 1),
            _ => r.string(UPPER_DIGITS, 1),
        })
        .collect();
    if country == "FR" {
        bban.push_str(&r.digits(2));
    }
    // ISO 13616 check digits: 98 - (BBAN + country + "00" mod 97).
    let mut rem = 0u32;
    for c in format!("{bban}{country}00").bytes() {
        rem = match c {
            b'0'..=b'9' => (rem * 10 + u32::from(c - b'0')) % 97,
            _ => (rem * 100 + u32::from(c - b'A') + 10) % 97,
        };
    }
    format!("{country}{:02}{bban}", 98 - rem)
}

fn format_iban(r: &mut Rng, compact: &str) -> String {
    if r.percent(50) {
        compact.to_owned()
    } else {
        let chunks: Vec<String> = compact
            .as_bytes()
            .chunks(4)
            .map(|c| String::from_utf8(c.to_vec()).unwrap())
            .collect();
        chunks.join(" ")
    }
}

fn iban(r: &mut Rng) -> Piece {
    let compact = iban_compact(r);
    let text = format_iban(r, &compact);
    let before = *r.pick(&["", "IBAN ", "wire to ", "IBAN: "]);
    Piece::around(before, "iban", text, "")
}

fn iban_negative(r: &mut Rng) -> Piece {
    let compact = iban_compact(r);
    let broken = match r.range(0, 2) {
        0 => {
            let check: u32 = compact[2..4].parse().unwrap();
            let other = (check + r.range(1, 50) as u32) % 97 + 2;
            let other = if other == check {
                check % 90 + 3
            } else {
                other
            };
            format!("{}{other:02}{}", &compact[..2], &compact[4..])
        }
        1 => compact[..compact.len() - 1].to_owned(),
        _ => format!("{}{}", r.pick(&["US", "XX", "CA"]), &compact[2..]),
    };
    Piece::negative(format_iban(r, &broken))
}

fn api_key(r: &mut Rng) -> Piece {
    let key = match r.range(0, 11) {
        0 => format!("sk-{}", r.string(BASE62, 48)),
        1 => {
            let len = r.range(60, 150) as usize;
            format!("sk-proj-{}", r.string(BASE64URL, len))
        }
        2 => format!("sk-ant-api03-{}AA", r.string(BASE64URL, 93)),
        3 => format!("AKIA{}", r.string(UPPER_DIGITS, 16)),
        4 => format!("gh{}_{}", r.pick(&["p", "o"]), r.string(BASE62, 36)),
        5 => format!(
            "github_pat_{}_{}",
            r.string(BASE62, 22),
            r.string(BASE62, 59)
        ),
        6 => format!(
            "xox{}-{}-{}-{}",
            r.pick(&["b", "p"]),
            r.digits(12),
            r.digits(13),
            r.string(BASE62, 24)
        ),
        7 => format!("{}_live_{}", r.pick(&["sk", "rk"]), r.string(BASE62, 24)),
        8 => format!("AIza{}", r.string(BASE64URL, 35)),
        _ => {
            // The generic rule: a random value after a credential-like name.
            let (alphabet, len) = if r.percent(30) {
                (HEX, r.range(24, 64))
            } else {
                (BASE62, r.range(20, 48))
            };
            let value = r.string(alphabet, len as usize);
            let (before, after) = *r.pick(&[
                ("api_key=", ""),
                ("\"client_secret\": \"", "\""),
                ("Authorization: Bearer ", ""),
                ("export SERVICE_TOKEN=", ""),
                ("password: ", ""),
                ("x-api-key: ", ""),
            ]);
            return Piece::around(before, "api_key", value, after);
        }
    };
    let before = *r.pick(&["", "export OPENAI_KEY=", "key ", "use "]);
    Piece::around(before, "api_key", key, "")
}

fn api_key_negative(r: &mut Rng) -> Piece {
    Piece::negative(match r.range(0, 11) {
        0 => {
            let len = r.range(4, 20) as usize;
            format!("sk-{}", r.string(BASE62, len))
        }
        1 => "pip install sk-learn".to_owned(),
        2 => format!(
            "sk-{}-{}-{}-{}",
            r.pick(&["this", "some", "the"]),
            r.pick(&["really", "very", "quite"]),
            r.pick(&["long-hyphenated", "descriptive-kebab-case"]),
            r.pick(&["identifier-name", "component-name-here"])
        ),
        3 => format!("AKIA{}", r.string(UPPER_DIGITS, 8)),
        4 => format!("ghp_{}", r.string(BASE62, 12)),
        5 => format!("pk_live_{}", r.string(BASE62, 24)),
        6 => r
            .pick(&[
                "api_key=your_api_key_goes_here",
                "token: <redacted>",
                "password=********************",
                "secret: REPLACE_ME_WITH_A_REAL_VALUE",
                "client_secret=XXXXXXXXXXXXXXXXXXXXXXXX",
                "the token expired yesterday afternoon",
                "session_token=replace_me_with_token_v2",
                "api_key=example_api_key_12345",
                "token: test-token-for-ci-0001",
            ])
            .to_string(),
        7 => format!("commit {}", r.string(HEX, 40)),
        8 => format!("request id {}", uuid(r)),
        9 => format!("token_count={}", r.digits(24)),
        10 => format!("max_tokens={}", r.range(100, 4096)),
        _ => format!("refresh_token_expires_in_seconds={}", r.range(60, 86400)),
    })
}

fn uuid(r: &mut Rng) -> String {
    format!(
        "{}-{}-4{}-a{}-{}",
        r.string(HEX, 8),
        r.string(HEX, 4),
        r.string(HEX, 3),
        r.string(HEX, 3),
        r.string(HEX, 12)
    )
}

fn octet(r: &mut Rng) -> u64 {
    r.range(0, 255)
}

fn ipv4(r: &mut Rng) -> Piece {
    let ip = format!("{}.{}.{}.{}", r.range(1, 223), octet(r), octet(r), octet(r));
    let (before, after) = *r.pick(&[
        ("from ", ""),
        ("host=", ":443"),
        ("(", ")"),
        ("upstream ", " timed out"),
        ("client ip ", ""),
    ]);
    Piece::around(before, "ipv4", ip, after)
}

fn ipv4_negative(r: &mut Rng) -> Piece {
    let (a, b, c, d) = (
        r.range(0, 20),
        r.range(0, 40),
        r.range(0, 99),
        r.range(0, 9),
    );
    Piece::negative(match r.range(0, 5) {
        0 => format!("version {a}.{b}.{c}.{d}"),
        1 => format!("v{a}.{b}.{c}.{d}"),
        2 => format!("build {a}.{b}.{c}.{d}"),
        3 => format!("sections {a}.{b}.{c}.{d}.{}", r.range(1, 9)),
        4 => format!("OID 1.3.6.1.4.1.{}", r.range(1, 60000)),
        _ => format!("{}.{b}.{c}.{d}", r.range(256, 999)),
    })
}

type Generator = fn(&mut Rng) -> Piece;

/// Per kind: (name, true-instance generator, hard-negative generator).
const KINDS: &[(&str, Generator, Generator)] = &[
    ("email", email, email_negative),
    ("phone", phone, phone_negative),
    ("ssn", ssn, ssn_negative),
    ("card", card, card_negative),
    ("iban", iban, iban_negative),
    ("api_key", api_key, api_key_negative),
    ("ipv4", ipv4, ipv4_negative),
];

/// `n` samples from `seed`: each fills a template with one or two pieces (a second piece in 20%
/// of samples); each piece is a true instance (60%) or a hard negative (40%) of a kind drawn
/// uniformly.
pub fn generate(seed: u64, n: usize) -> Vec<Sample> {
    let mut r = Rng::new(seed);
    (0..n)
        .map(|_| {
            let template = *r.pick(TEMPLATES);
            let count = if r.percent(20) { 2 } else { 1 };
            let pieces: Vec<Piece> = (0..count)
                .map(|_| {
                    let (_, positive, negative) = *r.pick(KINDS);
                    if r.percent(60) {
                        positive(&mut r)
                    } else {
                        negative(&mut r)
                    }
                })
                .collect();
            let (head, tail) = template.split_once("{}").expect("templates hold {}");
            let mut sample = Sample {
                text: head.to_owned(),
                labels: Vec::new(),
            };
            for (i, piece) in pieces.into_iter().enumerate() {
                if i > 0 {
                    sample.text.push_str(" and ");
                }
                sample.text.push_str(&piece.before);
                if let Some((kind, secret)) = piece.secret {
                    let start = sample.text.len();
                    sample.text.push_str(&secret);
                    sample.labels.push(Label {
                        kind,
                        start,
                        end: sample.text.len(),
                    });
                }
                sample.text.push_str(&piece.after);
            }
            sample.text.push_str(tail);
            sample
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dlp::checks;

    #[test]
    fn generation_is_deterministic() {
        assert_eq!(generate(1, 50), generate(1, 50));
        assert_ne!(generate(1, 50), generate(2, 50));
    }

    #[test]
    fn generated_checksums_are_right() {
        let mut r = Rng::new(3);
        for _ in 0..200 {
            let n = card_number(&mut r);
            assert!(checks::luhn_valid(n.as_bytes()), "{n}");
            let iban = iban_compact(&mut r);
            assert!(checks::iban_checksum_valid(iban.as_bytes()), "{iban}");
            assert_eq!(
                checks::iban_length(&iban.as_bytes()[..2]),
                Some(iban.len()),
                "{iban}"
            );
        }
    }
}
