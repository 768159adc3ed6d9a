//! Shared measurement helpers for the benchmarks (percentiles, formatting).

use std::time::Duration;

/// Order statistics of one set of timing samples.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    /// Number of samples.
    pub count: usize,
    /// Fastest sample.
    pub min: Duration,
    /// 50th percentile.
    pub median: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Slowest sample.
    pub max: Duration,
}

impl Summary {
    /// Summarises `samples` (sorted in place). Panics on an empty set: a bench that measured
    /// nothing has a bug, not a result.
    pub fn of(samples: &mut [Duration]) -> Summary {
        assert!(!samples.is_empty(), "no samples to summarise");
        samples.sort_unstable();
        Summary {
            count: samples.len(),
            min: samples[0],
            median: percentile(samples, 50.0),
            p90: percentile(samples, 90.0),
            p99: percentile(samples, 99.0),
            max: samples[samples.len() - 1],
        }
    }
}

/// The `p`-th percentile (0–100) of `sorted` by nearest rank, so the value reported is one
/// that was actually measured rather than an interpolation between two.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
    assert!(!sorted.is_empty(), "percentile of an empty set");
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Median of `values` (sorted in place), by nearest rank.
pub fn median_f64(values: &mut [f64]) -> f64 {
    values.sort_unstable_by(f64::total_cmp);
    percentile(values, 50.0)
}

/// A duration in microseconds with two decimals, right-aligned for tables.
pub fn micros(d: Duration) -> String {
    format!("{:>9.2} µs", d.as_secs_f64() * 1e6)
}

/// `PASS` or `MISS`, the word every target line ends with.
pub fn verdict(met: bool) -> &'static str {
    if met {
        "PASS"
    } else {
        "MISS"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let sorted: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&sorted, 50.0), 50);
        assert_eq!(percentile(&sorted, 90.0), 90);
        assert_eq!(percentile(&sorted, 99.0), 99);
        assert_eq!(percentile(&sorted, 0.0), 1);
        assert_eq!(percentile(&sorted, 100.0), 100);
        assert_eq!(percentile(&[7], 99.0), 7);
    }

    #[test]
    fn summary_sorts_and_reports_extremes() {
        let mut samples: Vec<Duration> = [5, 1, 3, 2, 4]
            .into_iter()
            .map(Duration::from_micros)
            .collect();
        let s = Summary::of(&mut samples);
        assert_eq!(s.count, 5);
        assert_eq!(s.min, Duration::from_micros(1));
        assert_eq!(s.median, Duration::from_micros(3));
        assert_eq!(s.max, Duration::from_micros(5));
    }
}
