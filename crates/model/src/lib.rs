//! # linattn-model
//!
//! A minimal decoder-only transformer on [candle](https://github.com/huggingface/candle)
//! that trains on text and generates in RNN mode: the job linear attention
//! ("Transformers are RNNs", Katharopoulos et al. 2020) was made for.
//!
//! - Byte tokens ([`VOCAB`] = 256, no tokenizer files), a token embedding
//!   plus sinusoidal positions (no maximum length), pre-norm blocks of
//!   [LayerNorm -> causal attention -> residual -> LayerNorm -> GELU MLP ->
//!   residual], a final LayerNorm and an output projection; candle-nn's
//!   `Linear`, LayerNorm and GELU.
//! - [`AttentionKind::Linear`] runs through `linattn-candle` (the project's
//!   kernels on a CUDA device, its chunked CPU path on the CPU): a parallel
//!   causal pass with the final (S, z) state out for the prompt, then one
//!   `decode_step` per token on that state (constant cost per token).
//!   [`AttentionKind::Softmax`] is the baseline in plain candle ops, with
//!   candle-nn's KV cache (cost per token growing with the position).
//! - Deterministic random weights from a seed ([`Model::random`]),
//!   safetensors [`Model::save`] / [`Model::load`] (loading through candle,
//!   after every name, shape and dtype is checked: [`ModelError`] names the
//!   tensor at fault).
//! - Training ([`Trainer`], [`TextData`]): next-byte cross-entropy, AdamW,
//!   train/validation losses in bits per byte.
//! - Generation ([`Generator`], [`Model::generate`]) with greedy or
//!   temperature [`Sampling`] from a seeded RNG.
//! - [`select_backend`] resolves `auto` / `cpu` / `gpu` for the CLI and says
//!   why (the GPU needs the `cuda` feature and a device).
//!
//! ## Example: prefill + decode equals the parallel forward
//!
//! ```
//! use linattn_model::{Config, Model, Sampling};
//!
//! let config = Config { d_model: 32, heads: 2, layers: 2, mlp: 64, ..Config::default() };
//! let model = Model::random(config, 42)?;
//! let text = b"hello, rnn";
//!
//! // Logits of all ten tokens in one parallel pass...
//! let full = model.forward_tokens(text)?;
//! // ...equal those of a prefill of six tokens plus four decode steps.
//! let (_, mut session) = model.prefill(&text[..6])?;
//! for (i, &t) in text.iter().enumerate().skip(6) {
//!     let logits = model.decode(&mut session, t)?;
//!     let want = &full[i * 256..(i + 1) * 256];
//!     let err = logits.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
//!     assert!(err < 1e-4, "token {i}: {err}");
//! }
//!
//! // Seeded sampling is reproducible.
//! let a = model.generate(b"Once", 8, Sampling::Temperature(0.8), 7)?;
//! assert_eq!(a, model.generate(b"Once", 8, Sampling::Temperature(0.8), 7)?);
//! # Ok::<(), linattn_model::ModelError>(())
//! ```

#![warn(missing_docs)]

mod backend;
mod config;
mod error;
mod generate;
mod io;
mod model;
mod train;

pub use backend::{gpu_device, gpu_unavailable_reason, select_backend, BackendChoice, Selection};
pub use config::{feature_map_name, parse_feature_map, AttentionKind, Config, VOCAB};
pub use error::{ModelError, Result};
pub use generate::{Generator, Sampling};
pub use linattn_candle::FeatureMap;
pub use model::{positions, Cache, Model, Session, LN_EPS};
pub use train::{evaluate, loss, Batch, TextData, Trainer};
