//! The arithmetic behind the detectors: Luhn, IBAN mod-97 and its country length table, card
//! IIN ranges, SSN validity and Shannon entropy. Pure functions over ASCII; sources are cited
//! per function and in `docs/dlp.md`.

/// Luhn check (ISO/IEC 7812-1, Annex B) over ASCII digits. `false` for an empty input or any
/// non-digit.
pub fn luhn_valid(digits: &[u8]) -> bool {
    if digits.is_empty() {
        return false;
    }
    let mut sum = 0u32;
    for (i, &d) in digits.iter().rev().enumerate() {
        if !d.is_ascii_digit() {
            return false;
        }
        let mut v = u32::from(d - b'0');
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

/// One issuer identification number (IIN) range: card numbers whose first `prefix_len` digits
/// lie in `lo..=hi` belong to `network`, and have one of the lengths whose bit is set in
/// `lengths` (bit *n* = length *n*).
struct IinRange {
    network: &'static str,
    prefix_len: usize,
    lo: u32,
    hi: u32,
    lengths: u32,
}

const fn lens(min: u32, max: u32) -> u32 {
    // Bits min..=max.
    ((1u32 << (max + 1)) - 1) & !((1u32 << min) - 1)
}

/// Issuer ranges of the major networks, as published by the networks (compiled in the
/// "Payment card number" article's IIN table). Ranges outside it (UATP `1`, private-label
/// cards, …) are not detected: a Luhn-valid digit run with an unknown prefix is far more often
/// an order or account number than a card.
#[rustfmt::skip]
const IIN_RANGES: &[IinRange] = &[
    IinRange { network: "visa", prefix_len: 1, lo: 4, hi: 4, lengths: 1 << 13 | 1 << 16 | 1 << 19 },
    IinRange { network: "mastercard", prefix_len: 2, lo: 51, hi: 55, lengths: 1 << 16 },
    IinRange { network: "mastercard", prefix_len: 4, lo: 2221, hi: 2720, lengths: 1 << 16 },
    IinRange { network: "amex", prefix_len: 2, lo: 34, hi: 34, lengths: 1 << 15 },
    IinRange { network: "amex", prefix_len: 2, lo: 37, hi: 37, lengths: 1 << 15 },
    IinRange { network: "discover", prefix_len: 4, lo: 6011, hi: 6011, lengths: lens(16, 19) },
    IinRange { network: "discover", prefix_len: 3, lo: 644, hi: 649, lengths: lens(16, 19) },
    IinRange { network: "discover", prefix_len: 2, lo: 65, hi: 65, lengths: lens(16, 19) },
    IinRange { network: "jcb", prefix_len: 4, lo: 3528, hi: 3589, lengths: lens(16, 19) },
    IinRange { network: "diners", prefix_len: 3, lo: 300, hi: 305, lengths: lens(14, 19) },
    IinRange { network: "diners", prefix_len: 4, lo: 3095, hi: 3095, lengths: lens(14, 19) },
    IinRange { network: "diners", prefix_len: 2, lo: 36, hi: 36, lengths: lens(14, 19) },
    IinRange { network: "diners", prefix_len: 2, lo: 38, hi: 39, lengths: lens(16, 19) },
    IinRange { network: "unionpay", prefix_len: 2, lo: 62, hi: 62, lengths: lens(16, 19) },
    IinRange { network: "maestro", prefix_len: 4, lo: 5018, hi: 5018, lengths: lens(13, 19) },
    IinRange { network: "maestro", prefix_len: 4, lo: 5020, hi: 5020, lengths: lens(13, 19) },
    IinRange { network: "maestro", prefix_len: 4, lo: 5038, hi: 5038, lengths: lens(13, 19) },
    IinRange { network: "maestro", prefix_len: 4, lo: 5893, hi: 5893, lengths: lens(13, 19) },
    IinRange { network: "maestro", prefix_len: 4, lo: 6304, hi: 6304, lengths: lens(13, 19) },
    IinRange { network: "maestro", prefix_len: 4, lo: 6759, hi: 6759, lengths: lens(13, 19) },
    IinRange { network: "maestro", prefix_len: 4, lo: 6761, hi: 6763, lengths: lens(13, 19) },
    IinRange { network: "mir", prefix_len: 4, lo: 2200, hi: 2204, lengths: lens(16, 19) },
    IinRange { network: "rupay", prefix_len: 2, lo: 60, hi: 60, lengths: 1 << 16 },
    IinRange { network: "rupay", prefix_len: 3, lo: 508, hi: 508, lengths: 1 << 16 },
    IinRange { network: "rupay", prefix_len: 2, lo: 81, hi: 82, lengths: 1 << 16 },
];

/// The network of a card number (ASCII digits, separators removed) if its prefix is a known
/// IIN and its length is valid for that IIN. Luhn is checked separately.
pub fn card_network(digits: &[u8]) -> Option<&'static str> {
    let len = u32::try_from(digits.len()).ok().filter(|l| *l < 32)?;
    IIN_RANGES.iter().find_map(|r| {
        let prefix = digits.get(..r.prefix_len)?;
        let p = prefix.iter().try_fold(0u32, |acc, d| {
            d.is_ascii_digit().then(|| acc * 10 + u32::from(d - b'0'))
        })?;
        (r.lo <= p && p <= r.hi && r.lengths & (1 << len) != 0).then_some(r.network)
    })
}

/// Whether a 9-digit SSN (area, group, serial) could have been issued: the SSA never assigns
/// area 000, 666 or 900–999, group 00 or serial 0000 (SSA, "Social Security Number
/// Randomization", effective 2011-06-25; the area rules predate it and still hold).
pub fn ssn_valid(area: u16, group: u8, serial: u16) -> bool {
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

/// IBAN length per country (ISO 3166-1 alpha-2), from the SWIFT IBAN Registry (ISO 13616-1
/// registration authority), as of 2024: 88 countries. Sorted by country for binary search.
#[rustfmt::skip]
const IBAN_LENGTHS: &[(&str, usize)] = &[
    ("AD", 24), ("AE", 23), ("AL", 28), ("AT", 20), ("AZ", 28), ("BA", 20), ("BE", 16),
    ("BG", 22), ("BH", 22), ("BI", 27), ("BR", 29), ("BY", 28), ("CH", 21), ("CR", 22),
    ("CY", 28), ("CZ", 24), ("DE", 22), ("DJ", 27), ("DK", 18), ("DO", 28), ("EE", 20),
    ("EG", 29), ("ES", 24), ("FI", 18), ("FK", 18), ("FO", 18), ("FR", 27), ("GB", 22),
    ("GE", 22), ("GI", 23), ("GL", 18), ("GR", 27), ("GT", 28), ("HR", 21), ("HU", 28),
    ("IE", 22), ("IL", 23), ("IQ", 23), ("IS", 26), ("IT", 27), ("JO", 30), ("KW", 30),
    ("KZ", 20), ("LB", 28), ("LC", 32), ("LI", 21), ("LT", 20), ("LU", 20), ("LV", 21),
    ("LY", 25), ("MC", 27), ("MD", 24), ("ME", 22), ("MK", 19), ("MN", 20), ("MR", 27),
    ("MT", 31), ("MU", 30), ("NI", 28), ("NL", 18), ("NO", 15), ("OM", 23), ("PK", 24),
    ("PL", 28), ("PS", 29), ("PT", 25), ("QA", 29), ("RO", 24), ("RS", 22), ("RU", 33),
    ("SA", 24), ("SC", 31), ("SD", 18), ("SE", 24), ("SI", 19), ("SK", 24), ("SM", 27),
    ("SO", 23), ("ST", 25), ("SV", 28), ("TL", 23), ("TN", 24), ("TR", 26), ("UA", 29),
    ("VA", 22), ("VG", 24), ("XK", 20), ("YE", 30),
];

/// The registered IBAN length of `country` (two upper-case letters), if it issues IBANs.
pub fn iban_length(country: &[u8]) -> Option<usize> {
    IBAN_LENGTHS
        .binary_search_by(|(c, _)| c.as_bytes().cmp(country))
        .ok()
        .map(|i| IBAN_LENGTHS[i].1)
}

/// ISO 7064 MOD 97-10 check of an IBAN in electronic form (upper-case letters and digits, no
/// spaces) as ISO 13616-1 specifies it: move the first four characters to the end, replace each
/// letter by two digits (A = 10 … Z = 35), and the number must be ≡ 1 (mod 97).
pub fn iban_checksum_valid(iban: &[u8]) -> bool {
    if iban.len() < 5 {
        return false;
    }
    let mut rem = 0u32;
    for &c in iban[4..].iter().chain(&iban[..4]) {
        rem = match c {
            b'0'..=b'9' => (rem * 10 + u32::from(c - b'0')) % 97,
            b'A'..=b'Z' => (rem * 100 + u32::from(c - b'A') + 10) % 97,
            _ => return false,
        };
    }
    rem == 1
}

/// Shannon entropy, in bits per byte, of the byte distribution of `s` (the "plug-in" estimate,
/// as secret scanners compute it). 0 for an empty input.
pub fn shannon_entropy(s: &[u8]) -> f64 {
    if s.is_empty() {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    for &b in s {
        counts[usize::from(b)] += 1;
    }
    let n = s.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_accepts_test_numbers_and_rejects_single_digit_errors() {
        for n in [
            "4111111111111111",
            "5555555555554444",
            "378282246310005",
            "79927398713",
        ] {
            assert!(luhn_valid(n.as_bytes()), "{n}");
        }
        for n in ["4111111111111112", "79927398710", "", "4111-1111"] {
            assert!(!luhn_valid(n.as_bytes()), "{n}");
        }
    }

    #[test]
    fn card_networks_need_prefix_and_length() {
        assert_eq!(card_network(b"4111111111111111"), Some("visa"));
        assert_eq!(card_network(b"2223003122003222"), Some("mastercard"));
        assert_eq!(card_network(b"378282246310005"), Some("amex"));
        assert_eq!(card_network(b"3782822463100050"), None, "amex is 15 digits");
        assert_eq!(
            card_network(b"9111111111111111"),
            None,
            "no network issues 9"
        );
        assert_eq!(card_network(b"1234567890123"), None);
    }

    #[test]
    fn ssn_ranges_follow_ssa_rules() {
        assert!(ssn_valid(123, 45, 6789));
        assert!(ssn_valid(899, 1, 1));
        assert!(!ssn_valid(0, 45, 6789));
        assert!(!ssn_valid(666, 45, 6789));
        assert!(!ssn_valid(900, 45, 6789));
        assert!(!ssn_valid(999, 45, 6789));
        assert!(!ssn_valid(123, 0, 6789));
        assert!(!ssn_valid(123, 45, 0));
    }

    #[test]
    fn iban_table_is_sorted_and_checksums_match_the_registry_examples() {
        assert!(IBAN_LENGTHS.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(iban_length(b"DE"), Some(22));
        assert_eq!(iban_length(b"US"), None);
        // Examples from the SWIFT IBAN Registry.
        for iban in [
            "DE89370400440532013000",
            "GB29NWBK60161331926819",
            "FR1420041010050500013M02606",
            "NO9386011117947",
            "MT84MALT011000012345MTLCAST001S",
        ] {
            assert!(iban_checksum_valid(iban.as_bytes()), "{iban}");
            assert_eq!(
                iban_length(&iban.as_bytes()[..2]),
                Some(iban.len()),
                "{iban}"
            );
        }
        assert!(!iban_checksum_valid(b"DE89370400440532013001"));
        assert!(!iban_checksum_valid(b"DE98370400440532013000"));
    }

    #[test]
    fn entropy_of_uniform_and_constant_strings() {
        assert_eq!(shannon_entropy(b""), 0.0);
        assert_eq!(shannon_entropy(b"aaaa"), 0.0);
        assert!((shannon_entropy(b"0123456789abcdef") - 4.0).abs() < 1e-9);
    }
}
