//! Precision and recall of the built-in detectors on the generated corpus (`dlp::corpus`),
//! per kind, with floors. Regenerate the table in `docs/dlp.md` with
//! `cargo test -p aegis-agent dlp::eval -- --nocapture`.
//!
//! A finding counts as a true positive only when kind, start and end all equal a label's; any
//! other finding is a false positive of its kind, any unmatched label a false negative of its
//! kind.

use std::collections::{BTreeMap, BTreeSet};

use super::{Detectors, corpus};

/// Corpus seed and size; changing either changes the published table.
const SEED: u64 = 0x00ae_9150_d1b0;
const SAMPLES: usize = 2_000;

/// Floors every kind must meet on the corpus.
const PRECISION_FLOOR: f64 = 0.95;
const RECALL_FLOOR: f64 = 0.95;

#[derive(Default)]
struct Counts {
    labels: usize,
    tp: usize,
    fp: usize,
    fn_: usize,
}

fn ratio(num: usize, den: usize) -> f64 {
    if den == 0 {
        1.0
    } else {
        num as f64 / den as f64
    }
}

#[test]
fn precision_and_recall() {
    let detectors = Detectors::all_builtins();
    let samples = corpus::generate(SEED, SAMPLES);
    let mut counts: BTreeMap<&str, Counts> = BTreeMap::new();
    let mut errors = Vec::new();
    for s in &samples {
        let found: BTreeSet<(String, usize, usize)> = detectors
            .scan(&s.text)
            .into_iter()
            .map(|f| (f.kind.name().to_owned(), f.start, f.end))
            .collect();
        let expected: BTreeSet<(String, usize, usize)> = s
            .labels
            .iter()
            .map(|l| (l.kind.to_owned(), l.start, l.end))
            .collect();
        for l in &s.labels {
            counts.entry(l.kind).or_default().labels += 1;
        }
        for (kind, start, end) in found.union(&expected) {
            let c = counts
                .entry(
                    super::Builtin::ALL
                        .iter()
                        .find(|b| b.name() == kind)
                        .unwrap()
                        .name(),
                )
                .or_default();
            match (
                found.contains(&(kind.clone(), *start, *end)),
                expected.contains(&(kind.clone(), *start, *end)),
            ) {
                (true, true) => c.tp += 1,
                (true, false) => {
                    c.fp += 1;
                    errors.push(format!(
                        "FP {kind} {:?} in {:?}",
                        &s.text[*start..*end],
                        s.text
                    ));
                }
                (false, true) => {
                    c.fn_ += 1;
                    errors.push(format!(
                        "FN {kind} {:?} in {:?}",
                        &s.text[*start..*end],
                        s.text
                    ));
                }
                (false, false) => unreachable!("from the union"),
            }
        }
    }

    println!("corpus: seed {SEED:#x}, {SAMPLES} samples");
    println!("| kind | labels | TP | FP | FN | precision | recall |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut below = Vec::new();
    for (kind, c) in &counts {
        let precision = ratio(c.tp, c.tp + c.fp);
        let recall = ratio(c.tp, c.tp + c.fn_);
        println!(
            "| `{kind}` | {} | {} | {} | {} | {precision:.3} | {recall:.3} |",
            c.labels, c.tp, c.fp, c.fn_
        );
        if precision < PRECISION_FLOOR || recall < RECALL_FLOOR {
            below.push(*kind);
        }
    }
    for e in &errors {
        println!("{e}");
    }
    assert!(
        counts.values().all(|c| c.labels >= 100),
        "every kind is well represented"
    );
    assert!(below.is_empty(), "under the floors: {below:?}");
}
