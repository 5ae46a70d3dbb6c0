//! Number types: the [`Real`] arithmetic the forms are generic over, and the
//! [`Element`] storage types (including f16/bf16) that convert on load.

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// Floating-point type the reference computes in: `f64` (what tests compare
/// against) or `f32` (to measure what single precision costs).
///
/// Kept deliberately small so the crate needs no numeric-traits dependency.
pub trait Real:
    Copy
    + Debug
    + Default
    + PartialOrd
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    /// Additive identity.
    const ZERO: Self;
    /// Multiplicative identity.
    const ONE: Self;
    /// Rounds an `f64` to this type.
    fn from_f64(x: f64) -> Self;
    /// Widens to `f64`.
    fn to_f64(self) -> f64;
    /// Natural exponential.
    fn exp(self) -> Self;
    /// Square root.
    fn sqrt(self) -> Self;
    /// True when neither NaN nor infinite.
    fn is_finite(self) -> bool;
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
        }
    };
}
impl_real!(f32);
impl_real!(f64);

/// A storage element the kernels read or write (`f16`, `bf16`, `f32`, `f64`).
///
/// The reference never computes in half precision: half inputs are widened on
/// load with [`to_f64_vec`] / [`to_f32_vec`], and reference outputs can be
/// rounded back with [`from_f64_slice`] to mimic a kernel's store.
pub trait Element: Copy + Send + Sync + 'static {
    /// Widens to `f64` exactly.
    fn to_f64(self) -> f64;
    /// Rounds an `f64` to this type (round to nearest even).
    fn from_f64(x: f64) -> Self;
}

impl Element for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(x: f64) -> Self {
        x
    }
}
impl Element for f32 {
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}
impl Element for half::f16 {
    fn to_f64(self) -> f64 {
        half::f16::to_f64(self)
    }
    fn from_f64(x: f64) -> Self {
        half::f16::from_f64(x)
    }
}
impl Element for half::bf16 {
    fn to_f64(self) -> f64 {
        half::bf16::to_f64(self)
    }
    fn from_f64(x: f64) -> Self {
        half::bf16::from_f64(x)
    }
}

/// Widens any element slice to `f64`, e.g. a kernel's f16 input buffer, so it
/// can be fed to the reference with the same layout.
pub fn to_f64_vec<E: Element>(xs: &[E]) -> Vec<f64> {
    xs.iter().map(|x| x.to_f64()).collect()
}

/// Converts any element slice to `f32` (through `f64`, exact for f16/bf16).
pub fn to_f32_vec<E: Element>(xs: &[E]) -> Vec<f32> {
    xs.iter().map(|x| x.to_f64() as f32).collect()
}

/// Rounds `f64` values to a storage element type, e.g. to build the f16 inputs
/// a kernel test uploads from random `f64` data.
pub fn from_f64_slice<E: Element>(xs: &[f64]) -> Vec<E> {
    xs.iter().map(|&x| E::from_f64(x)).collect()
}
