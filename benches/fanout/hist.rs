// SPDX-License-Identifier: MPL-2.0

//! Latency histogram: exact below 128 ns, then 64 sub-buckets per power of two
//! (under 1.6 % error).

pub struct Hist {
    counts: Vec<u64>,
    pub n: u64,
    pub max: u64,
}

impl Hist {
    pub fn new() -> Hist {
        Hist {
            counts: vec![0; 128 + 57 * 64],
            n: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < 128 {
            v as usize
        } else {
            let e = 63 - v.leading_zeros() as usize;
            let m = (v >> (e - 6)) as usize;
            128 + (e - 7) * 64 + (m - 64)
        }
    }

    /// (lowest value, width) of bucket `i`.
    fn bucket(i: usize) -> (u64, u64) {
        if i < 128 {
            (i as u64, 1)
        } else {
            let e = (i - 128) / 64 + 7;
            let m = ((i - 128) % 64 + 64) as u64;
            (m << (e - 6), 1 << (e - 6))
        }
    }

    pub fn record(&mut self, v: u64) {
        self.counts[Hist::index(v)] += 1;
        self.n += 1;
        self.max = self.max.max(v);
    }

    pub fn quantile(&self, q: f64) -> u64 {
        if self.n == 0 {
            return 0;
        }
        let target = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= target {
                let (lo, w) = Hist::bucket(i);
                return (lo + w / 2).min(self.max);
            }
        }
        self.max
    }
}
