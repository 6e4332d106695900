//! Shared by the benches: per-iteration timings taken from criterion's own measurements, and
//! the machine-readable `RESULT` lines `scripts/bench.sh` turns into `docs/PERFORMANCE.md`.
//!
//! A figure is only meaningful next to a baseline measured in the same run, because absolute
//! numbers on shared 2-core machines drift by tens of percent between runs.
// Each bench includes this file and uses only part of it.
#![allow(dead_code)]

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Per-iteration times (seconds) of one benchmark, one entry per criterion sample.
#[derive(Debug, Clone, Default)]
pub(crate) struct Samples(Rc<RefCell<Vec<f64>>>);

impl Samples {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Times `iters` runs of `routine` and records the mean per-iteration time. For
    /// `Bencher::iter_custom`, so criterion and the `RESULT` line see the same measurement.
    pub(crate) fn time(&self, iters: u64, mut routine: impl FnMut()) -> Duration {
        let start = Instant::now();
        for _ in 0..iters {
            routine();
        }
        let elapsed = start.elapsed();
        self.record(iters, elapsed);
        elapsed
    }

    /// Records `elapsed` for `iters` iterations measured by the caller.
    pub(crate) fn record(&self, iters: u64, elapsed: Duration) {
        self.0
            .borrow_mut()
            .push(elapsed.as_secs_f64() / iters.max(1) as f64);
    }

    /// Median per-iteration time in seconds; NaN if nothing was measured (a criterion filter
    /// left the benchmark out), which [`report`] then does not print.
    pub(crate) fn median_secs(&self) -> f64 {
        let mut samples = self.0.borrow().clone();
        if samples.is_empty() {
            return f64::NAN;
        }
        samples.sort_by(f64::total_cmp);
        let mid = samples.len() / 2;
        if samples.len() % 2 == 1 {
            samples[mid]
        } else {
            (samples[mid - 1] + samples[mid]) / 2.0
        }
    }
}

/// Prints one figure with its in-run baseline:
/// `RESULT <name> <value> <unit> <baseline-name> <baseline-value> <ratio>`, ratio = value /
/// baseline (for a rate, the fraction of the baseline reached; for a time, how many times
/// slower than the baseline). Run with a criterion filter, a figure whose benchmark or baseline
/// did not run is left out.
pub(crate) fn report(name: &str, value: f64, unit: &str, baseline: &str, baseline_value: f64) {
    // A figure without a measurement behind it, or without its baseline, must not be printed.
    if value.is_nan() || baseline_value.is_nan() {
        eprintln!("{name}: not reported, its benchmark or its baseline was filtered out");
        return;
    }
    let ratio = value / baseline_value;
    println!("RESULT {name} {value:.4} {unit} {baseline} {baseline_value:.4} {ratio:.3}");
}
