//! Feature maps and the options shared by every linear-attention entry point.

use crate::error::{ReferenceError, Result};
use crate::real::Real;

/// The feature map phi applied element-wise to queries and keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FeatureMap {
    /// `elu(x) + 1`: the paper's default; always positive, so normalised
    /// outputs are convex combinations of values.
    #[default]
    EluPlusOne,
    /// `max(x, 0)`: may be all zero, in which case the denominator is `eps`.
    Relu,
    /// `x`: the caller already applied a map.
    Identity,
}

impl FeatureMap {
    /// All maps, for tests that sweep them.
    pub const ALL: [FeatureMap; 3] = [
        FeatureMap::EluPlusOne,
        FeatureMap::Relu,
        FeatureMap::Identity,
    ];

    /// phi(x).
    #[inline(always)]
    pub fn apply<T: Real>(self, x: T) -> T {
        match self {
            FeatureMap::EluPlusOne => {
                if x > T::ZERO {
                    x + T::ONE
                } else {
                    x.exp()
                }
            }
            FeatureMap::Relu => {
                if x > T::ZERO {
                    x
                } else {
                    T::ZERO
                }
            }
            FeatureMap::Identity => x,
        }
    }

    /// phi'(x), for the backward pass (relu' is taken as 0 at the kink).
    #[inline(always)]
    pub fn derivative<T: Real>(self, x: T) -> T {
        match self {
            FeatureMap::EluPlusOne => {
                if x > T::ZERO {
                    T::ONE
                } else {
                    x.exp()
                }
            }
            FeatureMap::Relu => {
                if x > T::ZERO {
                    T::ONE
                } else {
                    T::ZERO
                }
            }
            FeatureMap::Identity => T::ONE,
        }
    }

    /// Writes phi(x) * scale into `out` (same length as `x`).
    #[inline]
    pub(crate) fn apply_into<T: Real>(self, x: &[T], scale: T, out: &mut [T]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = self.apply(v) * scale;
        }
    }
}

/// Options of linear attention: `o = s phi(q)^T S / (s phi(q)^T z + eps)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearAttentionOptions {
    /// Feature map phi applied to queries and keys.
    pub feature_map: FeatureMap,
    /// Divide by the normaliser `s phi(q)^T z + eps`; when false the output is
    /// the numerator `s phi(q)^T S` alone.
    pub normalize: bool,
    /// Added to the denominator so it is never zero (default 1e-6).
    pub eps: f64,
    /// Scale `s` applied to phi(q) (default 1.0, the paper's choice).
    pub scale: f64,
}

impl Default for LinearAttentionOptions {
    fn default() -> Self {
        LinearAttentionOptions {
            feature_map: FeatureMap::EluPlusOne,
            normalize: true,
            eps: 1e-6,
            scale: 1.0,
        }
    }
}

impl LinearAttentionOptions {
    /// Rejects non-finite scale and negative or non-finite eps.
    pub(crate) fn check(&self, func: &'static str) -> Result<()> {
        if !self.scale.is_finite() {
            return Err(ReferenceError::InvalidValue {
                func,
                arg: "opts.scale",
                detail: format!("scale = {}; expected a finite number", self.scale),
            });
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(ReferenceError::InvalidValue {
                func,
                arg: "opts.eps",
                detail: format!("eps = {}; expected a finite number >= 0", self.eps),
            });
        }
        Ok(())
    }
}

/// Which algorithm computes linear attention. All three give the same result
/// (to rounding); having independent forms lets each check the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Form {
    /// Straight from the definition: the (masked) N x N weight matrix, O(N^2).
    Quadratic,
    /// Token by token with a running state (S, z): the RNN view, O(N D M).
    Recurrent,
    /// Chunks of `chunk` rows: intra-chunk masked products plus the carried
    /// state, as fast kernels do. Any chunk size >= 1 works.
    Chunked {
        /// Rows per chunk (>= 1); the last chunk may be shorter.
        chunk: usize,
    },
}
