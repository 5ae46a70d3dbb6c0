//! The recurrent state (S, z) of one (batch, head) or (sequence, head).

use crate::error::{ReferenceError, Result};
use crate::real::Real;

/// Linear-attention state of one head: `S = sum_j phi(k_j) v_j^T` (D x M,
/// row-major: `s[d * m + e]`) and `z = sum_j phi(k_j)` (length D).
///
/// Entry points take and return one state per head, indexed `b * heads + h`
/// (dense) or `seq * heads + h` (varlen). Gradients with respect to a state
/// use the same type.
#[derive(Debug, Clone, PartialEq)]
pub struct State<T = f64> {
    /// Key size D (rows of S).
    pub d: usize,
    /// Value size M (columns of S).
    pub m: usize,
    /// S, row-major D x M.
    pub s: Vec<T>,
    /// z, length D.
    pub z: Vec<T>,
}

impl<T: Real> State<T> {
    /// The empty-history state: S = 0, z = 0.
    pub fn zeros(d: usize, m: usize) -> Self {
        State {
            d,
            m,
            s: vec![T::ZERO; d * m],
            z: vec![T::ZERO; d],
        }
    }

    /// `n` zero states, one per head.
    pub fn zeros_vec(n: usize, d: usize, m: usize) -> Vec<Self> {
        vec![Self::zeros(d, m); n]
    }

    /// Converts element-wise (e.g. an f32 state to f64).
    pub fn cast<U: Real>(&self) -> State<U> {
        State {
            d: self.d,
            m: self.m,
            s: self.s.iter().map(|x| U::from_f64(x.to_f64())).collect(),
            z: self.z.iter().map(|x| U::from_f64(x.to_f64())).collect(),
        }
    }

    /// Checks `d`, `m` and the buffer lengths.
    pub(crate) fn check(
        &self,
        func: &'static str,
        arg: &'static str,
        d: usize,
        m: usize,
    ) -> Result<()> {
        if self.d != d || self.m != m || self.s.len() != d * m || self.z.len() != d {
            return Err(ReferenceError::ShapeMismatch {
                func,
                arg,
                expected: format!(
                    "a state with d = {d}, m = {m}, s.len() = {}, z.len() = {d}",
                    d * m
                ),
                found: format!(
                    "d = {}, m = {}, s.len() = {}, z.len() = {}",
                    self.d,
                    self.m,
                    self.s.len(),
                    self.z.len()
                ),
            });
        }
        Ok(())
    }
}

/// Checks a list of per-head states (count and shapes).
pub(crate) fn check_states<T: Real>(
    states: &[State<T>],
    func: &'static str,
    arg: &'static str,
    count: usize,
    d: usize,
    m: usize,
) -> Result<()> {
    if states.len() != count {
        return Err(ReferenceError::ShapeMismatch {
            func,
            arg,
            expected: format!("{count} states (one per head)"),
            found: format!("{} states", states.len()),
        });
    }
    states.iter().try_for_each(|s| s.check(func, arg, d, m))
}
