//! linattn: linear attention ("Transformers are RNNs") with hand-written CUDA
//! kernels, a CPU reference that proves them right, and a minimal transformer.
//!
//! This facade re-exports the three crates:
//! - [`kernels`] (`linattn-kernels`): the CUDA kernels, their launch plans, and
//!   the GPU and CPU-emulator executors;
//! - [`mod@reference`] (`linattn-reference`): the plain CPU implementation;
//! - [`model`] (`linattn-model`): a small decoder-only transformer on candle,
//!   trained by `linattn train` ([`mod@train`]).
//!
//! ```
//! // What was compiled, and what this machine can run; never fails.
//! let report = linattn::info::report();
//! assert!(report.contains("device code:"));
//! ```

mod chart;
pub mod demo;
pub mod generate;
pub mod info;
pub mod train;

pub use linattn_kernels as kernels;
pub use linattn_model as model;
pub use linattn_reference as reference;
