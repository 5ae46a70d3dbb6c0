//! Helpers for tests across the workspace: a seeded RNG, error metrics and a
//! reproducible test seed.
//!
//! ```
//! use linattn_reference::testing::{rel_l2_error, Rng};
//! let mut rng = Rng::new(42);
//! let x = rng.normal_vec(16);
//! assert_eq!(rel_l2_error(&x, &x), 0.0);
//! assert_eq!(Rng::new(42).normal_vec(16), x); // same seed, same data
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

/// Environment variable that pins [`test_seed`].
pub const SEED_ENV: &str = "LINATTN_TEST_SEED";

/// Deterministic xoshiro256** generator seeded through SplitMix64.
///
/// Not cryptographic; chosen because it is tiny, fast and gives the same
/// stream on every platform, so a printed seed reproduces a failure exactly.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator whose whole stream is determined by `seed`.
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let out = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }

    /// Uniform integer in [lo, hi] (inclusive); `lo` if `hi < lo`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        if hi <= lo {
            return lo;
        }
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }

    /// Fair coin.
    pub fn bool(&mut self) -> bool {
        self.next_u64() >> 63 == 1
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Fills `xs` uniformly in [lo, hi).
    pub fn fill_uniform(&mut self, xs: &mut [f64], lo: f64, hi: f64) {
        xs.iter_mut().for_each(|x| *x = self.uniform(lo, hi));
    }

    /// Fills `xs` with standard normals.
    pub fn fill_normal(&mut self, xs: &mut [f64]) {
        xs.iter_mut().for_each(|x| *x = self.normal());
    }

    /// `n` uniforms in [lo, hi).
    pub fn uniform_vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }

    /// `n` standard normals.
    pub fn normal_vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.normal()).collect()
    }
}

/// `||actual - expected|| / ||expected||` (L2), the comparison metric used
/// across the workspace.
///
/// Returns `+inf` if the lengths differ or `actual` holds a NaN or infinity
/// (so a kernel that leaves garbage never passes); when `expected` is all
/// zero the absolute error norm is returned instead.
pub fn rel_l2_error(actual: &[f64], expected: &[f64]) -> f64 {
    if actual.len() != expected.len() || actual.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let mut diff = 0.0;
    let mut norm = 0.0;
    for (&a, &e) in actual.iter().zip(expected) {
        diff += (a - e) * (a - e);
        norm += e * e;
    }
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// Largest absolute difference; `+inf` on length mismatch or non-finite input.
pub fn max_abs_error(actual: &[f64], expected: &[f64]) -> f64 {
    if actual.len() != expected.len() || actual.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    actual
        .iter()
        .zip(expected)
        .fold(0.0, |m, (&a, &e)| f64::max(m, (a - e).abs()))
}

/// Seed for randomised tests: `LINATTN_TEST_SEED` if set (decimal or `0x`
/// hex), otherwise a fresh one from the clock. Always printed to stderr so a
/// failing run can be replayed with `LINATTN_TEST_SEED=<seed>`.
pub fn test_seed() -> u64 {
    let from_env = std::env::var(SEED_ENV).ok().and_then(|s| {
        let s = s.trim();
        match s.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => s.parse().ok(),
        }
    });
    let seed = from_env.unwrap_or_else(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        // Mix so that seeds taken in quick succession differ in every bit.
        Rng::new(nanos ^ u64::from(std::process::id())).next_u64()
    });
    eprintln!("{SEED_ENV}={seed}");
    seed
}
