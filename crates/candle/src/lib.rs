//! Linear attention ("Transformers are RNNs", Katharopoulos et al. 2020) as
//! candle ops, with autograd, states, decode and varlen batches.
//!
//! On a CUDA tensor (feature `cuda`) the op runs the project's kernels from
//! `linattn-kernels` on candle's own stream, reading candle's device memory
//! in place; on a CPU tensor it runs a chunked CPU implementation (f32
//! arithmetic, O(N (D + M)) memory per head). See `docs/candle.md` for what is
//! zero-copy, the dtypes, the streams and how gradients reach each input.
//!
//! - [`linear_attention`]: q, k `[B, H, N, D]` or `[B, N, H, D]`
//!   ([`QkvLayout`]), v `[.., M]`; causal or not; output like v.
//! - [`linear_attention_with_state`]: the same with an initial [`State`] in
//!   and the final state out (fp32 `S [B, H, D, M]`, `z [B, H, D]`).
//! - [`varlen_linear_attention`]: packed `[total_tokens, H, D]` sequences
//!   delimited by `cu_seqlens`, one state per (sequence, head).
//! - [`decode_step`]: one token per (batch, head) advances a state.
//!
//! Gradients reach q, k, v and the initial state through candle's backprop;
//! the final state is returned detached (it is for the next call, not a loss).
//!
//! # Example: prefill, then decode
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use linattn_candle::{decode_step, linear_attention_with_state, AttentionOptions, QkvLayout};
//!
//! # fn main() -> Result<(), linattn_candle::Error> {
//! let dev = Device::Cpu;
//! let (b, h, n, d, m) = (1, 2, 16, 8, 8);
//! let q = Tensor::randn(0f32, 1.0, (b, h, n, d), &dev)?;
//! let k = Tensor::randn(0f32, 1.0, (b, h, n, d), &dev)?;
//! let v = Tensor::randn(0f32, 1.0, (b, h, n, m), &dev)?;
//! let opts = AttentionOptions::default(); // elu+1, normalised, eps 1e-6, scale 1
//! // Prefill: one causal pass over the prompt, keep the fp32 state.
//! let (o, mut state) =
//!     linear_attention_with_state(&q, &k, &v, QkvLayout::Bhnd, true, &opts, None)?;
//! assert_eq!(o.dims(), &[b, h, n, m]);
//! assert_eq!(state.s.dims(), &[b, h, d, m]);
//! // Decode: each step takes one token per (batch, head), costs the same
//! // whatever the position, and returns the advanced state.
//! for _ in 0..4 {
//!     let qt = Tensor::randn(0f32, 1.0, (b, h, d), &dev)?;
//!     let kt = Tensor::randn(0f32, 1.0, (b, h, d), &dev)?;
//!     let vt = Tensor::randn(0f32, 1.0, (b, h, m), &dev)?;
//!     let (ot, next) = decode_step(&qt, &kt, &vt, &state, &opts)?;
//!     assert_eq!(ot.dims(), &[b, h, m]);
//!     state = next;
//! }
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod op;

use candle_core::{DType, Device, Tensor};

pub use linattn_kernels::AttentionOptions;
pub use linattn_kernels::FeatureMap;

/// How q, k, v (and the output) are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QkvLayout {
    /// `[B, H, N, dim]`.
    Bhnd,
    /// `[B, N, H, dim]`.
    Bnhd,
}

/// A linear-attention state: `S = S0 + sum_j phi(k_j) v_j^T` and
/// `z = z0 + sum_j phi(k_j)`, fp32, one per (batch or sequence, head).
#[derive(Debug, Clone)]
pub struct State {
    /// `S`, `[B, H, D, M]` f32 (varlen: `[num_seqs, H, D, M]`).
    pub s: Tensor,
    /// `z`, `[B, H, D]` f32 (varlen: `[num_seqs, H, D]`).
    pub z: Tensor,
}

impl State {
    /// The empty-history state (zeros) for `units` = `(B, H)` and sizes D, M.
    pub fn zeros(batch: usize, heads: usize, d: usize, m: usize, device: &Device) -> Result<Self> {
        Ok(State {
            s: Tensor::zeros((batch, heads, d, m), DType::F32, device)?,
            z: Tensor::zeros((batch, heads, d), DType::F32, device)?,
        })
    }
}

/// Everything that can go wrong; each variant names the op and the argument.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument failed validation.
    #[error("{op}: invalid argument `{arg}`: {problem}")]
    InvalidArgument {
        /// The operation.
        op: &'static str,
        /// The argument at fault.
        arg: &'static str,
        /// What was expected and what was found.
        problem: String,
    },
    /// A dtype this op does not support.
    #[error("{op}: argument `{arg}` has dtype {dtype:?}; supported: {supported}")]
    UnsupportedDType {
        /// The operation.
        op: &'static str,
        /// The argument at fault.
        arg: &'static str,
        /// Its dtype.
        dtype: DType,
        /// What is supported.
        supported: &'static str,
    },
    /// A device this op does not run on (Metal; CUDA without the `cuda` feature).
    #[error("{op}: argument `{arg}` is on {device}; supported: the CPU, and CUDA with the `cuda` feature")]
    UnsupportedDevice {
        /// The operation.
        op: &'static str,
        /// The argument at fault.
        arg: &'static str,
        /// The device, in words.
        device: String,
    },
    /// candle reported an error (while copying, reshaping, or in a custom op).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The kernels reported an error (CUDA path).
    #[error(transparent)]
    Kernels(#[from] linattn_kernels::Error),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn invalid(op: &'static str, arg: &'static str, problem: impl std::fmt::Display) -> Error {
    Error::InvalidArgument {
        op,
        arg,
        problem: problem.to_string(),
    }
}

const QKV_DTYPES: &str = "f32, f16, bf16";

fn check_device(
    op: &'static str,
    arg: &'static str,
    t: &Tensor,
    like: Option<&Tensor>,
) -> Result<()> {
    match t.device() {
        Device::Cpu => {}
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {}
        other => {
            return Err(Error::UnsupportedDevice {
                op,
                arg,
                device: format!("{:?}", other.location()),
            })
        }
    }
    if let Some(like) = like {
        if !t.device().same_device(like.device()) {
            return Err(invalid(
                op,
                arg,
                format!(
                    "on {:?}, but q is on {:?}",
                    t.device().location(),
                    like.device().location()
                ),
            ));
        }
    }
    Ok(())
}

fn check_qkv_dtype(op: &'static str, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
    for (arg, t) in [("q", q), ("k", k), ("v", v)] {
        if !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::UnsupportedDType {
                op,
                arg,
                dtype: t.dtype(),
                supported: QKV_DTYPES,
            });
        }
        if t.dtype() != q.dtype() {
            return Err(invalid(
                op,
                arg,
                format!(
                    "dtype {:?}, but q is {:?}: q, k, v share one dtype",
                    t.dtype(),
                    q.dtype()
                ),
            ));
        }
    }
    Ok(())
}

fn check_rank(
    op: &'static str,
    arg: &'static str,
    t: &Tensor,
    rank: usize,
    what: &str,
) -> Result<()> {
    if t.rank() != rank {
        return Err(invalid(
            op,
            arg,
            format!("rank {} (shape {:?}); expected {what}", t.rank(), t.dims()),
        ));
    }
    Ok(())
}

/// A copy only when the last dimension is not contiguous (stride != 1).
fn last_dim_contiguous(t: &Tensor) -> Result<Tensor> {
    let stride = t.stride();
    if t.dims().last().copied().unwrap_or(1) > 1 && stride.last() != Some(&1) {
        Ok(t.contiguous()?)
    } else {
        Ok(t.clone())
    }
}

fn check_state(
    op: &'static str,
    st: &State,
    units: (usize, usize),
    d: usize,
    m: usize,
    q: &Tensor,
) -> Result<()> {
    for (arg, t, want) in [
        ("initial.s", &st.s, vec![units.0, units.1, d, m]),
        ("initial.z", &st.z, vec![units.0, units.1, d]),
    ] {
        check_device(op, arg, t, Some(q))?;
        if t.dtype() != DType::F32 {
            return Err(Error::UnsupportedDType {
                op,
                arg,
                dtype: t.dtype(),
                supported: "f32 (states are always fp32)",
            });
        }
        if t.dims() != want.as_slice() {
            return Err(invalid(
                op,
                arg,
                format!("shape {:?}; expected {:?}", t.dims(), want),
            ));
        }
    }
    Ok(())
}

fn check_opts(op: &'static str, opts: &AttentionOptions) -> Result<()> {
    if !(opts.eps.is_finite() && opts.eps >= 0.0) {
        return Err(invalid(
            op,
            "opts.eps",
            format!("eps = {}; expected a finite number >= 0", opts.eps),
        ));
    }
    if !opts.scale.is_finite() {
        return Err(invalid(
            op,
            "opts.scale",
            format!("scale = {}; expected a finite number", opts.scale),
        ));
    }
    Ok(())
}

/// Validated dense q, k, v: (B, H, N, D, M).
fn check_dense(
    op: &'static str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: QkvLayout,
) -> Result<(usize, usize, usize, usize, usize)> {
    let what = match layout {
        QkvLayout::Bhnd => "4: [B, H, N, dim]",
        QkvLayout::Bnhd => "4: [B, N, H, dim]",
    };
    check_device(op, "q", q, None)?;
    check_device(op, "k", k, Some(q))?;
    check_device(op, "v", v, Some(q))?;
    check_qkv_dtype(op, q, k, v)?;
    for (arg, t) in [("q", q), ("k", k), ("v", v)] {
        check_rank(op, arg, t, 4, what)?;
    }
    let bhn = |t: &Tensor| {
        let x = t.dims();
        match layout {
            QkvLayout::Bhnd => (x[0], x[1], x[2]),
            QkvLayout::Bnhd => (x[0], x[2], x[1]),
        }
    };
    let (b, h, n) = bhn(q);
    let (d, m) = (q.dims()[3], v.dims()[3]);
    for (arg, t) in [("k", k), ("v", v)] {
        if bhn(t) != (b, h, n) {
            return Err(invalid(
                op,
                arg,
                format!(
                    "shape {:?}; (B, H, N) must match q's {:?}",
                    t.dims(),
                    (b, h, n)
                ),
            ));
        }
    }
    if k.dims()[3] != d {
        return Err(invalid(
            op,
            "k",
            format!("key size {}; must match q's D = {d}", k.dims()[3]),
        ));
    }
    if b == 0 || h == 0 || n == 0 || d == 0 || m == 0 {
        return Err(invalid(
            op,
            "q",
            format!("a zero-sized dimension: B={b} H={h} N={n} D={d} M={m}"),
        ));
    }
    Ok((b, h, n, d, m))
}

/// Linear attention over `[B, H, N, D]` or `[B, N, H, D]` tensors (see
/// [`QkvLayout`]): `o_i = s phi(q_i)^T S_i / (s phi(q_i)^T z_i + eps)` with
/// the sums over `j <= i` (causal) or all `j`.
///
/// q, k: `[.., D]`, v: `[.., M]`, all one dtype (f32, f16, bf16) on one
/// device (CPU, or CUDA with the `cuda` feature). Returns o in v's layout
/// with dim M, contiguous. Differentiable in q, k, v.
///
/// Errors: [`Error::InvalidArgument`] for a wrong rank, mismatched B/H/N/D,
/// a zero-sized dimension or bad options; [`Error::UnsupportedDType`],
/// [`Error::UnsupportedDevice`].
pub fn linear_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: QkvLayout,
    causal: bool,
    opts: &AttentionOptions,
) -> Result<Tensor> {
    const OP: &str = "linear_attention";
    check_opts(OP, opts)?;
    let (b, h, n, d, m) = check_dense(OP, q, k, v, layout)?;
    let spec = op::Spec {
        name: OP,
        causal,
        opts: *opts,
        kind: op::Kind::Dense(layout),
        heads: h,
        d,
        m,
        seqs: vec![(0, n); b],
    };
    Ok(op::apply(spec, q, k, v, None)?.0)
}

/// Runs `spec` with `initial` in (zeros when `None`) and the final state out:
/// the tail of every entry point that returns a state.
fn apply_with_state(
    spec: op::Spec,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    initial: Option<&State>,
) -> Result<(Tensor, State)> {
    let name = spec.name;
    let (o, fin) = op::apply(spec, q, k, v, Some(initial))?;
    let fin = fin.ok_or_else(|| invalid(name, "initial", "no final state came back"))?;
    Ok((o, fin))
}

/// [`linear_attention`] with an initial state in (zeros when `None`) and the
/// final state out.
///
/// `initial`: `S [B, H, D, M]`, `z [B, H, D]`, f32, on q's device. The output
/// is differentiable in q, k, v and in the initial state; the returned final
/// state is detached.
///
/// Errors: those of [`linear_attention`], and [`Error::InvalidArgument`] /
/// [`Error::UnsupportedDType`] for a state of the wrong shape or dtype.
pub fn linear_attention_with_state(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: QkvLayout,
    causal: bool,
    opts: &AttentionOptions,
    initial: Option<&State>,
) -> Result<(Tensor, State)> {
    const OP: &str = "linear_attention_with_state";
    check_opts(OP, opts)?;
    let (b, h, n, d, m) = check_dense(OP, q, k, v, layout)?;
    if let Some(st) = initial {
        check_state(OP, st, (b, h), d, m, q)?;
    }
    let spec = op::Spec {
        name: OP,
        causal,
        opts: *opts,
        kind: op::Kind::Dense(layout),
        heads: h,
        d,
        m,
        seqs: vec![(0, n); b],
    };
    apply_with_state(spec, q, k, v, initial)
}

/// Linear attention over packed variable-length sequences: q, k
/// `[total_tokens, H, D]`, v `[total_tokens, H, M]`; sequence `s` owns tokens
/// `cu_seqlens[s]..cu_seqlens[s + 1]` and attends only to itself.
///
/// `cu_seqlens` starts at 0, never decreases and ends at `total_tokens`
/// (empty sequences pass their state through). `initial` holds one state
/// per (sequence, head): `S [num_seqs, H, D, M]`, `z [num_seqs, H, D]`.
/// Returns o `[total_tokens, H, M]` and the final states; differentiable in
/// q, k, v and the initial state.
pub fn varlen_linear_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &[usize],
    causal: bool,
    opts: &AttentionOptions,
    initial: Option<&State>,
) -> Result<(Tensor, State)> {
    const OP: &str = "varlen_linear_attention";
    check_opts(OP, opts)?;
    check_device(OP, "q", q, None)?;
    check_device(OP, "k", k, Some(q))?;
    check_device(OP, "v", v, Some(q))?;
    check_qkv_dtype(OP, q, k, v)?;
    for (arg, t) in [("q", q), ("k", k), ("v", v)] {
        check_rank(OP, arg, t, 3, "3: [total_tokens, H, dim]")?;
    }
    let (t, h, d) = q.dims3()?;
    let m = v.dims()[2];
    for (arg, x) in [("k", k), ("v", v)] {
        if x.dims()[..2] != [t, h] {
            return Err(invalid(
                OP,
                arg,
                format!(
                    "shape {:?}; (total_tokens, H) must match q's ({t}, {h})",
                    x.dims()
                ),
            ));
        }
    }
    if k.dims()[2] != d {
        return Err(invalid(
            OP,
            "k",
            format!("key size {}; must match q's D = {d}", k.dims()[2]),
        ));
    }
    if h == 0 || d == 0 || m == 0 {
        return Err(invalid(
            OP,
            "q",
            format!("a zero-sized dimension: H={h} D={d} M={m}"),
        ));
    }
    if cu_seqlens.len() < 2
        || cu_seqlens[0] != 0
        || *cu_seqlens.last().unwrap() != t
        || cu_seqlens.windows(2).any(|w| w[1] < w[0])
    {
        return Err(invalid(
            OP,
            "cu_seqlens",
            format!("{cu_seqlens:?}; expected at least two offsets, starting at 0, never decreasing, ending at total_tokens = {t}"),
        ));
    }
    let seqs: Vec<(usize, usize)> = cu_seqlens.windows(2).map(|w| (w[0], w[1] - w[0])).collect();
    if let Some(st) = initial {
        check_state(OP, st, (seqs.len(), h), d, m, q)?;
    }
    let spec = op::Spec {
        name: OP,
        causal,
        opts: *opts,
        kind: op::Kind::Varlen,
        heads: h,
        d,
        m,
        seqs,
    };
    apply_with_state(spec, q, k, v, initial)
}

/// One autoregressive step: q, k `[B, H, D]` and v `[B, H, M]` of one token
/// per (batch, head) advance `state` (`S += phi(k) v^T`, `z += phi(k)`), then
/// `o = s phi(q)^T S / (s phi(q)^T z + eps)`.
///
/// Returns o `[B, H, M]` (q's dtype) and the advanced state as new tensors:
/// candle tensors are immutable values shared by reference counting, so an
/// in-place update could change a tensor another part of the program still
/// holds (a cached prefix state, a tensor in the autograd graph). The copy is
/// O(B H D M) per step, the size of the state the step reads anyway. Not
/// differentiable (an inference path).
pub fn decode_step(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    state: &State,
    opts: &AttentionOptions,
) -> Result<(Tensor, State)> {
    const OP: &str = "decode_step";
    check_opts(OP, opts)?;
    check_device(OP, "q", q, None)?;
    check_device(OP, "k", k, Some(q))?;
    check_device(OP, "v", v, Some(q))?;
    check_qkv_dtype(OP, q, k, v)?;
    for (arg, t) in [("q", q), ("k", k), ("v", v)] {
        check_rank(OP, arg, t, 3, "3: [B, H, dim] (one token)")?;
    }
    let (b, h, d) = q.dims3()?;
    let m = v.dims()[2];
    for (arg, x) in [("k", k), ("v", v)] {
        if x.dims()[..2] != [b, h] {
            return Err(invalid(
                OP,
                arg,
                format!("shape {:?}; (B, H) must match q's ({b}, {h})", x.dims()),
            ));
        }
    }
    if k.dims()[2] != d {
        return Err(invalid(
            OP,
            "k",
            format!("key size {}; must match q's D = {d}", k.dims()[2]),
        ));
    }
    if b == 0 || h == 0 || d == 0 || m == 0 {
        return Err(invalid(
            OP,
            "q",
            format!("a zero-sized dimension: B={b} H={h} D={d} M={m}"),
        ));
    }
    check_state(OP, state, (b, h), d, m, q).map_err(|e| match e {
        Error::InvalidArgument { op, arg, problem } => Error::InvalidArgument {
            op,
            arg: if arg == "initial.s" {
                "state.s"
            } else {
                "state.z"
            },
            problem,
        },
        Error::UnsupportedDType {
            op,
            arg,
            dtype,
            supported,
        } => Error::UnsupportedDType {
            op,
            arg: if arg == "initial.s" {
                "state.s"
            } else {
                "state.z"
            },
            dtype,
            supported,
        },
        e => e,
    })?;
    op::decode(q, k, v, state, opts, (b, h, d, m))
}
