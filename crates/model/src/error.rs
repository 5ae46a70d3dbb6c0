//! The crate's error type.

use std::path::PathBuf;

use thiserror::Error;

/// Everything the model can reject: bad configurations, bad weight files,
/// bad inputs (prompts, texts, training settings), and failures of candle or
/// of the linear-attention op. Each variant carries
/// enough context (the tensor, the setting, the file) to act on.
#[derive(Debug, Error)]
pub enum ModelError {
    /// A configuration value is out of range.
    #[error("invalid model config: `{field}` {detail}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// What is wrong and what was expected.
        detail: String,
    },
    /// A weight file lacks a tensor the configuration needs.
    #[error("weights: tensor `{name}` is missing (expected shape {expected:?})")]
    MissingTensor {
        /// Name of the tensor.
        name: String,
        /// The shape the configuration asks for.
        expected: Vec<usize>,
    },
    /// A tensor in a weight file has the wrong shape.
    #[error("weights: tensor `{name}` has shape {found:?}; expected {expected:?}")]
    TensorShape {
        /// Name of the tensor.
        name: String,
        /// The shape the configuration asks for.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor in a weight file has a dtype the model cannot read.
    #[error("weights: tensor `{name}` has dtype {dtype}; expected F32, F16, BF16 or F64")]
    TensorDtype {
        /// Name of the tensor.
        name: String,
        /// The dtype in the file.
        dtype: String,
    },
    /// A weight file holds a tensor this configuration does not use.
    #[error("weights: unexpected tensor `{name}` (not part of this model configuration)")]
    UnexpectedTensor {
        /// Name of the tensor.
        name: String,
    },
    /// A tensor holds NaN or infinite values.
    #[error("weights: tensor `{name}` holds a non-finite value at index {index}")]
    NonFinite {
        /// Name of the tensor.
        name: String,
        /// Flat index of the first bad element.
        index: usize,
    },
    /// The file's `__metadata__` lacks or garbles a configuration entry.
    #[error("weights: metadata entry `{key}` {detail}")]
    Metadata {
        /// The metadata key.
        key: String,
        /// What is wrong.
        detail: String,
    },
    /// The safetensors container itself is malformed.
    #[error("weights: not a valid safetensors file: {0}")]
    Format(String),
    /// Reading or writing a file failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("reading", "writing").
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An input to a model call is invalid (empty prompt, bad temperature...).
    #[error("{func}: {detail}")]
    InvalidInput {
        /// The function that rejected it.
        func: &'static str,
        /// What is wrong and what was expected.
        detail: String,
    },
    /// The requested backend cannot run on this machine or build.
    #[error("backend `{backend}` is unavailable: {reason}")]
    BackendUnavailable {
        /// The backend asked for.
        backend: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// candle reported an error (a tensor op, the optimiser, a device).
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// `linattn-candle` rejected or failed a linear-attention call.
    #[error("linear attention: {0}")]
    Attention(#[from] linattn_candle::Error),
    /// An error inside one transformer block, with the block's index.
    #[error("block {layer}: {source}")]
    InBlock {
        /// The transformer block.
        layer: usize,
        /// The underlying error.
        #[source]
        source: Box<ModelError>,
    },
}

/// Result alias used throughout the crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
