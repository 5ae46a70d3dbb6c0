//! Autoregressive generation: prefill the prompt, then sample and decode one
//! token at a time, with a seeded RNG.

use linattn_reference::testing::Rng;

use crate::config::VOCAB;
use crate::error::{ModelError, Result};
use crate::model::{Model, Session};

/// How the next byte is picked from the logits.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Sampling {
    /// The most likely byte (ties: the lowest).
    #[default]
    Greedy,
    /// Draw from `softmax(logits / t)`; `t` must be finite and positive.
    Temperature(f32),
}

impl Sampling {
    /// `Greedy` for `t == 0`, else `Temperature(t)`.
    pub fn from_temperature(t: f32) -> Self {
        if t == 0.0 {
            Sampling::Greedy
        } else {
            Sampling::Temperature(t)
        }
    }

    pub(crate) fn check(self) -> Result<()> {
        match self {
            Sampling::Temperature(t) if !(t.is_finite() && t > 0.0) => {
                Err(ModelError::InvalidInput {
                    func: "Sampling::Temperature",
                    detail: format!("temperature {t}; expected a finite number > 0 (0 = greedy)"),
                })
            }
            _ => Ok(()),
        }
    }

    /// Picks a token from 256 logits. NaN logits are never chosen; if all
    /// are NaN this is an error rather than a silent byte 0.
    pub fn sample(self, logits: &[f32], rng: &mut Rng) -> Result<u8> {
        self.check()?;
        let finite = |x: &f32| x.is_finite();
        if logits.len() != VOCAB || !logits.iter().any(finite) {
            return Err(ModelError::InvalidInput {
                func: "Sampling::sample",
                detail: format!(
                    "got {} logits ({} finite); expected {VOCAB} with at least one finite",
                    logits.len(),
                    logits.iter().filter(|x| finite(x)).count()
                ),
            });
        }
        let (best, max) = logits.iter().enumerate().filter(|(_, x)| finite(x)).fold(
            (0, f32::NEG_INFINITY),
            |(bi, bx), (i, &x)| {
                if x > bx {
                    (i, x)
                } else {
                    (bi, bx)
                }
            },
        );
        let t = match self {
            Sampling::Greedy => return Ok(best as u8),
            Sampling::Temperature(t) => t as f64,
        };
        let weights: Vec<f64> = logits
            .iter()
            .map(|&x| {
                if x.is_finite() {
                    ((x as f64 - max as f64) / t).exp()
                } else {
                    0.0
                }
            })
            .collect();
        let total: f64 = weights.iter().sum();
        let mut r = rng.next_f64() * total;
        for (i, w) in weights.iter().enumerate() {
            if r < *w {
                return Ok(i as u8);
            }
            r -= w;
        }
        Ok(best as u8) // rounding left r just above the last weight
    }
}

/// Token-by-token generation from a prompt.
///
/// [`Generator::new`] runs the parallel prefill; each [`Generator::next_token`]
/// then costs exactly one sample and one decode step (of the previously
/// sampled token), so timing it times one step at the current position.
///
/// On the CPU, decode a single stream with `RAYON_NUM_THREADS=1` set before
/// the process starts any thread: a step's products have one row, and
/// without that variable candle's CPU matmul queries the core count and
/// wakes rayon's workers for each of them (about 5x slower at the demo's
/// size; docs/benchmarks.md, "One thread for decoding").
pub struct Generator<'a> {
    model: &'a Model,
    session: Session,
    logits: Vec<f32>,
    pending: Option<u8>,
    sampling: Sampling,
    rng: Rng,
}

impl<'a> Generator<'a> {
    /// Prefills `prompt` (at least one byte).
    pub fn new(model: &'a Model, prompt: &[u8], sampling: Sampling, seed: u64) -> Result<Self> {
        sampling.check()?;
        let (logits, session) = model.prefill(prompt)?;
        let last = logits[logits.len() - VOCAB..].to_vec();
        Ok(Generator {
            model,
            session,
            logits: last,
            pending: None,
            sampling,
            rng: Rng::new(seed),
        })
    }

    /// Decodes the previous token (if any) and samples the next one.
    pub fn next_token(&mut self) -> Result<u8> {
        if let Some(t) = self.pending.take() {
            self.logits = self.model.decode(&mut self.session, t)?;
        }
        let t = self.sampling.sample(&self.logits, &mut self.rng)?;
        self.pending = Some(t);
        Ok(t)
    }

    /// Tokens the model has processed (prompt plus decoded ones).
    pub fn position(&self) -> usize {
        self.session.position()
    }

    /// The decode state.
    pub fn session(&self) -> &Session {
        &self.session
    }
}

impl Model {
    /// Generates `max_new_tokens` bytes after `prompt`: prefill, then one
    /// decode step per byte, sampled with `sampling` from an RNG seeded
    /// with `seed` (same inputs, same bytes).
    pub fn generate(
        &self,
        prompt: &[u8],
        max_new_tokens: usize,
        sampling: Sampling,
        seed: u64,
    ) -> Result<Vec<u8>> {
        let mut g = Generator::new(self, prompt, sampling, seed)?;
        (0..max_new_tokens).map(|_| g.next_token()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_max_and_skips_nan() {
        let mut l = vec![0.0f32; VOCAB];
        l[7] = 3.0;
        l[9] = f32::NAN;
        let mut rng = Rng::new(1);
        assert_eq!(Sampling::Greedy.sample(&l, &mut rng).unwrap(), 7);
        assert!(Sampling::Greedy
            .sample(&[f32::NAN; VOCAB], &mut rng)
            .is_err());
    }

    #[test]
    fn temperature_follows_the_distribution() {
        // Two live tokens with logit gap ln 3 at t = 1: a 3 : 1 split.
        let mut l = vec![-1e30f32; VOCAB];
        l[1] = 3f32.ln();
        l[2] = 0.0;
        let mut rng = Rng::new(5);
        let n = 20_000;
        let ones = (0..n)
            .filter(|_| Sampling::Temperature(1.0).sample(&l, &mut rng).unwrap() == 1)
            .count();
        let p = ones as f64 / n as f64;
        assert!((p - 0.75).abs() < 0.02, "p = {p}");
        // A tiny temperature is greedy in effect.
        assert_eq!(Sampling::Temperature(1e-3).sample(&l, &mut rng).unwrap(), 1);
    }

    #[test]
    fn bad_temperatures_are_rejected() {
        let l = vec![0.0f32; VOCAB];
        let mut rng = Rng::new(0);
        for t in [-1.0, f32::NAN, f32::INFINITY] {
            assert!(Sampling::Temperature(t).sample(&l, &mut rng).is_err());
        }
        assert_eq!(Sampling::from_temperature(0.0), Sampling::Greedy);
    }
}
