//! A latency histogram cheap enough for the hot path: fixed buckets, one atomic counter each,
//! so an observation is a search over 16 bounds and two relaxed adds, never a lock.
//!
//! Requests, connects and response heads all live in one range (a loopback connect takes
//! 50 µs, a slow backend seconds), so one set of bounds serves them all and dashboards can
//! compare them bucket for bucket: 100 µs to 10 s in 1-2.5-5 steps per decade.
//!
//! A snapshot is read bucket by bucket while others observe; its count is the sum of the
//! buckets read, so `+Inf` always equals `_count` (the sum may be an observation ahead).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use serde::{Deserialize, Serialize, Serializer};

/// Upper bounds of the buckets, in nanoseconds (the last bucket, +Inf, is implicit).
const BOUNDS_NS: [u64; 16] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Buckets with +Inf.
const BUCKETS: usize = BOUNDS_NS.len() + 1;

/// Durations observed, by bucket.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is above 10 s.
    buckets: [AtomicU64; BUCKETS],
    /// Sum of all observations, in nanoseconds (584 years of them fit).
    sum_ns: AtomicU64,
}

/// A histogram as read at one moment, in seconds, as /stats carries it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistogramSnap {
    /// Observations.
    pub count: u64,
    /// Their sum, in seconds.
    pub sum: f64,
    /// `(upper bound in seconds, observations in that bucket)`, not cumulative; +Inf is
    /// written as `f64::MAX` (JSON has no infinity).
    pub buckets: Vec<(f64, u64)>,
}

// === impl Histogram ===

impl Histogram {
    /// Counts one duration.
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // partition_point: the first bound >= ns, i.e. the bucket `le` that holds it.
        let i = BOUNDS_NS.partition_point(|b| *b < ns);
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Reads it.
    pub fn snapshot(&self) -> HistogramSnap {
        let buckets: Vec<(f64, u64)> = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let le = BOUNDS_NS.get(i).map_or(f64::MAX, |ns| *ns as f64 / 1e9);
                (le, n.load(Ordering::Relaxed))
            })
            .collect();
        HistogramSnap {
            count: buckets.iter().map(|(_, n)| n).sum(),
            sum: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            buckets,
        }
    }
}

/// Stats structs derive Serialize; a histogram serializes as its snapshot.
impl Serialize for Histogram {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.snapshot().serialize(s)
    }
}

// === impl HistogramSnap ===

/// Encoded through prometheus-client's own histogram encoding (cumulative buckets, `_sum`,
/// `_count`), so the text is the library's, not ours.
impl EncodeMetric for HistogramSnap {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_observation_lands_in_the_first_bucket_whose_bound_holds_it() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(100)); // le 0.0001, bounds are inclusive
        h.observe(Duration::from_micros(101)); // le 0.00025
        h.observe(Duration::from_millis(3)); // le 0.005
        h.observe(Duration::from_secs(11)); // +Inf
        let s = h.snapshot();
        let nonzero: Vec<(f64, u64)> = s.buckets.iter().copied().filter(|b| b.1 > 0).collect();
        assert_eq!(
            nonzero,
            vec![(0.0001, 1), (0.00025, 1), (0.005, 1), (f64::MAX, 1)]
        );
        assert_eq!(s.count, 4);
        assert!((s.sum - 11.003201).abs() < 1e-9, "sum {}", s.sum);
    }

    #[test]
    fn a_snapshot_survives_json() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(1));
        let s = h.snapshot();
        let back: HistogramSnap =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
