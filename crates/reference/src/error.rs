//! The crate's error type.

use thiserror::Error;

/// Everything a public function of this crate can reject.
///
/// Each variant names the function (`func`) and the argument (`arg`) at fault
/// and says what was expected, so a failing kernel test points straight at the
/// bad shape or buffer instead of at a panic deep in a loop.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReferenceError {
    /// A dimension that must be at least 1 is zero.
    #[error("{func}: argument `{arg}` has {dim} = 0; expected at least 1")]
    ZeroSized {
        /// Function that rejected the input.
        func: &'static str,
        /// Argument at fault.
        arg: &'static str,
        /// Which dimension is zero.
        dim: &'static str,
    },
    /// Two different (batch, head, token) rows of a layout share elements.
    #[error("{func}: argument `{arg}` has overlapping strides: {detail}; expected every (batch, head, token) row to own its elements")]
    OverlappingStrides {
        /// Function that rejected the input.
        func: &'static str,
        /// Argument at fault.
        arg: &'static str,
        /// The two rows that collide, or the stride at fault.
        detail: String,
    },
    /// The largest offset a layout can address does not fit in `usize`.
    #[error("{func}: argument `{arg}`: strides and sizes overflow usize; expected the largest offset to fit")]
    StrideOverflow {
        /// Function that rejected the input.
        func: &'static str,
        /// Argument at fault.
        arg: &'static str,
    },
    /// A buffer is shorter than its layout needs.
    #[error(
        "{func}: argument `{arg}` has {len} elements; expected at least {required} for its layout"
    )]
    BufferTooShort {
        /// Function that rejected the input.
        func: &'static str,
        /// Argument at fault.
        arg: &'static str,
        /// Length of the buffer given.
        len: usize,
        /// Length the layout requires.
        required: usize,
    },
    /// Shapes of two arguments disagree (or an argument has the wrong shape).
    #[error("{func}: argument `{arg}` has {found}; expected {expected}")]
    ShapeMismatch {
        /// Function that rejected the input.
        func: &'static str,
        /// Argument at fault.
        arg: &'static str,
        /// What was expected.
        expected: String,
        /// What was given.
        found: String,
    },
    /// Cumulative sequence offsets are malformed.
    #[error("{func}: argument `{arg}` is invalid: {detail}")]
    InvalidOffsets {
        /// Function that rejected the input.
        func: &'static str,
        /// Argument at fault.
        arg: &'static str,
        /// What is wrong and what was expected.
        detail: String,
    },
    /// A scalar option is out of range (chunk size 0, negative or NaN eps...).
    #[error("{func}: argument `{arg}` is invalid: {detail}")]
    InvalidValue {
        /// Function that rejected the input.
        func: &'static str,
        /// Argument at fault.
        arg: &'static str,
        /// What is wrong and what was expected.
        detail: String,
    },
}

/// Result alias used throughout the crate.
pub type Result<T, E = ReferenceError> = std::result::Result<T, E>;
