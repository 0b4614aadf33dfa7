//! A small seeded generator (splitmix64): the same numbers on every machine and build.

/// splitmix64 (Steele, Lea, Flood 2014): one 64-bit word of state, good enough mixing for a
/// simulation, trivially reproducible.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x7E55_E7A5_1A11_5EED)
    }

    /// An independent generator for one purpose, so that adding draws in one part of the
    /// model does not shift every other part.
    pub fn fork(&mut self, purpose: u64) -> Rng {
        Rng(self.next_u64() ^ purpose.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        // Multiply-shift: no modulo bias worth speaking of for the small n used here.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            return lo;
        }
        lo + self.below((hi - lo) as u64 + 1) as i64
    }

    /// True with probability `per_million` / 1,000,000.
    pub fn chance_ppm(&mut self, per_million: u32) -> bool {
        self.below(1_000_000) < u64::from(per_million)
    }

    /// An exponentially distributed wait with the given mean (the time to the next event of
    /// a Poisson process), from 1 ms to 20 means.
    pub fn exponential(&mut self, mean_ms: i64) -> i64 {
        if mean_ms <= 0 {
            return 1;
        }
        // -ln(1 - u) for u uniform in [0, 1).
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let wait = -ln(1.0 - u) * mean_ms as f64;
        (wait as i64).clamp(1, mean_ms.saturating_mul(20))
    }
}

/// The natural logarithm of `x` > 0 from additions, multiplications and divisions only, which
/// IEEE 754 rounds the same way everywhere (`f64::ln` comes from the platform's libm, whose
/// last bit may differ between machines, and with it a whole run).
fn ln(x: f64) -> f64 {
    const LN_2: f64 = std::f64::consts::LN_2;
    // x = m · 2^e with m in [1, 2).
    let bits = x.to_bits();
    let e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52));
    // ln m = 2 atanh(z), z = (m - 1) / (m + 1) in [0, 1/3).
    let z = (m - 1.0) / (m + 1.0);
    let z2 = z * z;
    let (mut term, mut sum) = (z, 0.0);
    for k in 0..30 {
        sum += term / (2 * k + 1) as f64;
        term *= z2;
    }
    e as f64 * LN_2 + 2.0 * sum
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn the_same_seed_gives_the_same_numbers() {
        let a: Vec<u64> = (0..5)
            .scan(Rng::new(7), |r, _| Some(r.next_u64()))
            .collect();
        let b: Vec<u64> = (0..5)
            .scan(Rng::new(7), |r, _| Some(r.next_u64()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(
            a,
            (0..5)
                .scan(Rng::new(8), |r, _| Some(r.next_u64()))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn ln_matches_the_standard_one() {
        for x in [1e-12, 0.001, 0.25, 0.5, 0.7, 0.999_999, 1.0] {
            assert!((super::ln(x) - f64::ln(x)).abs() < 1e-12, "{x}");
        }
    }

    #[test]
    fn bounds_hold() {
        let mut rng = Rng::new(1);
        for _ in 0..10_000 {
            assert!(rng.below(7) < 7);
            let r = rng.range(-3, 3);
            assert!((-3..=3).contains(&r));
            let e = rng.exponential(1000);
            assert!((1..=20_000).contains(&e));
        }
        let mean: i64 = (0..20_000).map(|_| rng.exponential(1000)).sum::<i64>() / 20_000;
        assert!((900..1100).contains(&mean), "mean {mean}");
    }
}
