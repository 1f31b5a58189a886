//! Small helpers the benchmarks share: percentiles, reading fields of tool output, and the
//! machine facts printed at the head of a report.

/// The `q` quantile (0..=1) of `v`, nearest rank; sorts `v`. NaN when empty.
pub fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i]
}

/// The median of `v`; sorts `v`.
pub fn median(v: &mut [f64]) -> f64 {
    percentile(v, 0.5)
}

/// The first word after `key` on the first line (trimmed) that starts with it, e.g.
/// `field(dnsperf_output, "Queries per second:")`.
pub fn field(out: &str, key: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(|rest| {
            rest.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned()
        })
}

/// Number of CPUs this process may run on.
pub fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// The running kernel's release (`uname -r`).
pub fn uname_r() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_fields() {
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(median(&mut v), 3.0);
        assert_eq!(percentile(&mut v, 1.0), 5.0);
        assert!(percentile(&mut [], 0.5).is_nan());
        let out = "  Queries per second:   1234.5\n  Queries lost:  0 (0.00%)\n";
        assert_eq!(field(out, "Queries per second:").as_deref(), Some("1234.5"));
        assert_eq!(field(out, "Queries lost:").as_deref(), Some("0"));
        assert_eq!(field(out, "Missing:"), None);
    }
}
