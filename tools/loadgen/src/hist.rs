//! Log-linear histogram in the spirit of HdrHistogram: values below 2^SUB are exact; above,
//! each power of two is split into 2^(SUB-1) equal buckets, so the relative error is < 2^-(SUB-1)
//! (under 0.8 % with SUB = 8). Values are nanoseconds; fixed memory (~14 KiB), O(1) record.

const SUB: u32 = 8;
const HALF: usize = 1 << (SUB - 1);
const BUCKETS: usize = (64 - SUB as usize + 1) * HALF + HALF;

#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

fn index(v: u64) -> usize {
    if v < (1 << SUB) {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb - (SUB - 1);
    let sub = (v >> shift) as usize; // in [HALF, 2*HALF)
    ((shift as usize) << (SUB - 1)) + sub
}

/// Highest value that lands in bucket `i`.
fn upper(i: usize) -> u64 {
    if i < (1 << SUB) {
        return i as u64;
    }
    let shift = (i >> (SUB - 1)) - 1;
    let sub = (i - (shift << (SUB - 1))) as u64;
    let hi = ((sub + 1) as u128) << shift;
    (hi - 1).min(u64::MAX as u128) as u64
}

impl Histogram {
    pub fn new() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.total += 1;
        self.sum += v as u128;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    pub fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.total += o.total;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// Value at percentile `p` (0..=100): the bucket's upper bound, clamped to the real max.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((p / 100.0) * self.total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return upper(i).min(self.max).max(self.min);
            }
        }
        self.max
    }

    /// Percentile in microseconds with 0.1 us resolution (values are recorded in ns).
    pub fn p_us(&self, p: f64) -> f64 {
        (self.percentile(p) as f64 / 100.0).round() / 10.0
    }

    /// The latency-by-percentile curve, HdrHistogram style: `(percentile, microseconds)` at
    /// `per_decade` points per decade of `1 / (1 - p)` (0, 20.6, 36.9, .., 90, .., 99, ..)
    /// up to the last rank the sample count resolves (`1 - 1/count`), then the maximum at 100.
    pub fn distribution(&self, per_decade: u32) -> Vec<(f64, f64)> {
        let mut out = Vec::new();
        if self.total == 0 {
            return out;
        }
        let last = (self.total as f64).log10();
        let mut k = 0u32;
        loop {
            let decades = k as f64 / per_decade.max(1) as f64;
            if decades > last {
                break;
            }
            let p = 100.0 * (1.0 - 10f64.powf(-decades));
            out.push(((p * 1e4).round() / 1e4, self.p_us(p)));
            k += 1;
        }
        out.push((100.0, self.max_us()));
        out
    }

    pub fn max_us(&self) -> f64 {
        (self.max as f64 / 100.0).round() / 10.0
    }

    pub fn mean_us(&self) -> f64 {
        (self.mean() / 100.0).round() / 10.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_monotonic() {
        let mut prev = 0;
        for v in (0..5_000_000u64).step_by(7).chain([u64::MAX / 2, u64::MAX]) {
            let i = index(v);
            assert!(i >= prev, "index not monotonic at {v}");
            assert!(i < BUCKETS);
            assert!(upper(i) >= v, "upper({i}) = {} < {v}", upper(i));
            prev = i;
        }
        for i in 1..BUCKETS - 1 {
            assert_eq!(index(upper(i)), i);
            assert_eq!(index(upper(i) + 1), i + 1);
        }
    }

    #[test]
    fn percentiles_within_one_percent() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 1000);
        }
        for (p, exact) in [
            (50.0, 50_000_000.0),
            (99.0, 99_000_000.0),
            (99.9, 99_900_000.0),
        ] {
            let got = h.percentile(p) as f64;
            assert!((got - exact).abs() / exact < 0.01, "p{p}: {got} vs {exact}");
        }
        assert_eq!(h.percentile(100.0), 100_000_000);
        assert_eq!(h.count(), 100_000);
        let mut g = Histogram::new();
        g.record(5);
        g.merge(&h);
        assert_eq!(g.count(), 100_001);
        assert_eq!(g.percentile(0.0), 5);
    }

    #[test]
    fn distribution_is_monotonic_and_ends_at_the_max() {
        let mut h = Histogram::new();
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        let d = h.distribution(10);
        assert_eq!(d.first().map(|x| x.0), Some(0.0));
        assert_eq!(d.last(), Some(&(100.0, 10_000.0)));
        // 10 points per decade over 4 decades, plus the maximum.
        assert_eq!(d.len(), 42);
        for w in d.windows(2) {
            assert!(w[1].0 > w[0].0 && w[1].1 >= w[0].1, "{w:?}");
        }
        let p99 = d.iter().find(|x| x.0 == 99.0).expect("p99 is a point");
        assert!((p99.1 - 9_900.0).abs() < 80.0, "{p99:?}");
        assert!(Histogram::new().distribution(10).is_empty());
    }

    #[test]
    fn empty() {
        let h = Histogram::new();
        assert_eq!(h.percentile(99.0), 0);
        assert_eq!(h.mean(), 0.0);
    }
}
