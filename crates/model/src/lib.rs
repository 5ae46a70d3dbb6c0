//! # linattn-model
//!
//! A minimal decoder-only transformer that generates in RNN mode: the job
//! linear attention ("Transformers are RNNs", Katharopoulos et al. 2020) was
//! made for.
//!
//! - Byte tokens ([`VOCAB`] = 256, no tokenizer files), a token embedding
//!   plus sinusoidal positions (no maximum length), pre-norm blocks of
//!   [LayerNorm -> causal attention -> residual -> LayerNorm -> GELU MLP ->
//!   residual], a final LayerNorm and an output projection.
//! - [`AttentionKind::Linear`] (the paper's, with a [`FeatureMap`]) or
//!   [`AttentionKind::Softmax`] (the baseline).
//! - Deterministic random weights from a seed ([`Model::random`]), and
//!   safetensors [`Model::save`] / [`Model::load`] that validate every name,
//!   shape and dtype ([`ModelError`] names the tensor at fault).
//! - Generation ([`Generator`], [`Model::generate`]): a parallel causal
//!   [`Model::prefill`] of the prompt, then one [`Model::decode`] step per
//!   token from the returned [`Session`]: per-head (S, z) states for linear
//!   attention (constant cost per token), a KV cache for softmax (cost
//!   growing with the position). Greedy or temperature [`Sampling`] with a
//!   seeded RNG.
//!
//! The attention op sits behind [`AttentionBackend`]; everything else
//! (projections through `matrixmultiply`, LayerNorm, GELU) runs on the CPU
//! in f32. [`CpuAttention`] uses `linattn-reference`; [`KernelAttention`]
//! runs linear attention through the project's CUDA kernels on a
//! `linattn_kernels::Device` (a GPU, or the CPU emulator in tests).
//! [`GpuModel`] runs the whole forward on a `Device`: the project's
//! kernels for embedding, LayerNorm, GELU, residuals and both attention
//! kinds (softmax with a device KV cache), projections through cuBLAS on a
//! GPU (the CPU GEMM on the emulator). [`select_backend`] resolves `auto` /
//! `cpu` / `gpu` for the CLI and says why: the GPU backend is `GpuModel`
//! (driven by [`GpuGenerator`]), and without a usable GPU `gpu` is an
//! explicit error (see `docs/model.md`).
//!
//! ## Example: prefill + decode equals the parallel forward
//!
//! ```
//! use linattn_model::{Config, CpuAttention, Model, Sampling};
//!
//! let config = Config { d_model: 32, heads: 2, layers: 2, mlp: 64, ..Config::default() };
//! let model = Model::random(config, 42)?;
//! let cpu = CpuAttention;
//! let text = b"hello, rnn";
//!
//! // Logits of all ten tokens in one parallel pass...
//! let full = model.forward(&cpu, text)?;
//! // ...equal those of a prefill of six tokens plus four decode steps.
//! let (_, mut session) = model.prefill(&cpu, &text[..6])?;
//! for (i, &t) in text.iter().enumerate().skip(6) {
//!     let logits = model.decode(&cpu, &mut session, t)?;
//!     let want = &full[i * 256..(i + 1) * 256];
//!     let err = logits.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
//!     assert!(err < 1e-4, "token {i}: {err}");
//! }
//!
//! // Seeded sampling is reproducible.
//! let a = model.generate(&cpu, b"Once", 8, Sampling::Temperature(0.8), 7)?;
//! assert_eq!(a, model.generate(&cpu, b"Once", 8, Sampling::Temperature(0.8), 7)?);
//! # Ok::<(), linattn_model::ModelError>(())
//! ```

#![warn(missing_docs)]

mod attention;
mod backend;
mod config;
mod error;
mod generate;
mod gpu;
mod io;
mod kernels;
mod math;
mod model;

pub use attention::{AttentionBackend, AttentionSpec, CpuAttention, CpuCache};
pub use backend::{
    gpu_device, gpu_unavailable_reason, select_backend, Backend, BackendChoice, Selection,
};
pub use config::{feature_map_name, parse_feature_map, AttentionKind, Config, VOCAB};
pub use error::{ModelError, Result};
pub use generate::{Generator, Sampling};
pub use gpu::{GpuGenerator, GpuModel, GpuSession};
pub use kernels::{KernelAttention, KernelCache};
pub use linattn_reference::FeatureMap;
pub use model::{Model, Session};

/// The CPU model's f32 building blocks, public so that the GPU kernels that
/// replace them (`linattn_kernels::ops::model_ops`) are tested against the
/// very functions the CPU path runs.
pub mod cpu_ops {
    /// The LayerNorm epsilon of every norm in the model.
    pub const LN_EPS: f32 = crate::math::LN_EPS;

    /// GELU, tanh approximation, as the CPU model's MLP applies it.
    pub fn gelu(x: f32) -> f32 {
        crate::math::gelu(x)
    }

    /// Adds the sinusoidal encoding of position `pos` to `row` (f64 angles).
    pub fn add_position(row: &mut [f32], pos: usize) {
        crate::math::add_position(row, pos)
    }

    /// The CPU LayerNorm: each row of `x` (rows of `gain.len()`, which must
    /// equal `bias.len()`) normalised into `out`.
    pub fn layer_norm(x: &[f32], gain: &[f32], bias: &[f32], out: &mut [f32]) {
        crate::math::LayerNorm {
            gain: gain.to_vec(),
            bias: bias.to_vec(),
        }
        .forward(x, out)
    }
}
