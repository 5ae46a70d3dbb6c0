//! # linattn-reference
//!
//! Plain-CPU ground truth for linattn: every CUDA kernel and the model are
//! checked against this crate. It implements the math of
//! `docs/linear-attention.md` (Katharopoulos et al. 2020, "Transformers are
//! RNNs") as simply as possible, in `f64` (or `f32`):
//!
//! - linear attention, causal and non-causal, in three independent forms
//!   ([`Form::Quadratic`], [`Form::Recurrent`], [`Form::Chunked`]) with
//!   initial and final [`State`]s, feature maps, normalisation, eps and scale;
//! - single-token [`decode_step`] and batched [`decode`] on a state;
//! - packed variable-length batches ([`varlen_causal_linear_attention`]);
//! - constant-memory backward passes ([`causal_linear_attention_backward`]);
//! - softmax attention, causal and not, and a [`KvCache`] decode baseline;
//! - [`testing`] helpers (seeded RNG, [`testing::rel_l2_error`], [`testing::test_seed`]).
//!
//! ## Conventions
//!
//! Inputs are [`View`]s: a flat slice plus a [`Layout`] giving (batch, heads,
//! tokens, dim) and free batch/head/token strides (the last dim contiguous), so
//! both `[B, H, N, D]` ([`Layout::bhnd`]) and `[B, N, H, D]` ([`Layout::bnhd`])
//! buffers are read in place. Queries and keys have key size D, values value
//! size M. Dense outputs are owned [`Tensor`]s in contiguous `[B, H, N, M]`;
//! varlen outputs are packed `[total_tokens, H, M]` ([`Layout::packed`]); use
//! [`Tensor::to_layout`] to compare with a kernel's strided output. States
//! are one per head, indexed `b * H + h` (or `seq * H + h`), each `S` row-major
//! D x M plus `z` of length D. Bad input returns a [`ReferenceError`]; public
//! functions do not panic on it.
//!
//! ## Speed
//!
//! The recurrent and chunked forms are tight loops over contiguous rows. On
//! one CPU core (f32, causal, D = M = 64; `benches/reference_cpu.rs`, details
//! in `crates/reference/BENCH.md`) linear attention overtakes softmax between
//! N = 64 and 128, and is ~136x faster at N = 16384 (34.7 ms vs 4.7 s).
//!
//! ## Example: prefill, then decode one token
//!
//! ```
//! use linattn_reference::{
//!     causal_linear_attention, decode_step, testing::{rel_l2_error, Rng}, Layout,
//!     LinearAttentionOptions, View,
//! };
//! let (b, h, n, d, m) = (1, 2, 5, 4, 3);
//! let mut rng = Rng::new(7);
//! let q = rng.normal_vec(b * h * (n + 1) * d);
//! let k = rng.normal_vec(b * h * (n + 1) * d);
//! let v = rng.normal_vec(b * h * (n + 1) * m);
//! let opts = LinearAttentionOptions::default();
//! // The whole sequence of n + 1 tokens in [B, N, H, D] layout.
//! let (lq, lv) = (Layout::bnhd(b, h, n + 1, d), Layout::bnhd(b, h, n + 1, m));
//! let (full, _) = causal_linear_attention(
//!     View::new(&q, lq)?, View::new(&k, lq)?, View::new(&v, lv)?, &opts, None)?;
//! // Prefill the first n tokens (same buffers, fewer tokens), keep the states...
//! let (lq_n, lv_n) = (Layout { tokens: n, ..lq }, Layout { tokens: n, ..lv });
//! let (_, mut states) = causal_linear_attention(
//!     View::new(&q, lq_n)?, View::new(&k, lq_n)?, View::new(&v, lv_n)?, &opts, None)?;
//! // ...then decode token n of head 1 from its state: same output.
//! let row = |x: &[f64], l: &Layout| x[l.offset(0, 1, n)..][..l.dim].to_vec();
//! let o = decode_step(&mut states[1], &row(&q, &lq), &row(&k, &lq), &row(&v, &lv), &opts)?;
//! let expected = full.row(0, 1, n).unwrap();
//! assert!(rel_l2_error(&o, expected) < 1e-12);
//! # Ok::<(), linattn_reference::ReferenceError>(())
//! ```

#![warn(missing_docs)]

mod backward;
mod error;
mod kernels;
mod layout;
mod linear;
mod options;
mod real;
mod softmax;
mod state;
pub mod testing;

pub use backward::{
    causal_linear_attention_backward, linear_attention_backward,
    varlen_causal_linear_attention_backward, Gradients,
};
pub use error::{ReferenceError, Result};
pub use layout::{Layout, Tensor, View};
pub use linear::{
    causal_linear_attention, causal_linear_attention_with, decode, decode_step, linear_attention,
    linear_attention_with, varlen_causal_linear_attention, varlen_linear_attention,
};
pub use options::{FeatureMap, Form, LinearAttentionOptions};
pub use real::{from_f64_slice, to_f32_vec, to_f64_vec, Element, Real};
pub use softmax::{softmax_attention, softmax_probabilities, KvCache};
pub use state::State;
