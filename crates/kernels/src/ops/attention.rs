//! The vocabulary every attention op shares: the shape and strides of q,
//! k, v and o ([`AttentionShape`], [`Strides`]), the options
//! ([`AttentionOptions`], [`ScheduleChoice`]), causality ([`Kind`]), and the
//! argument bundles ([`Qkv`], [`StateRef`], [`StateMut`], [`StateIo`]).
//!
//! States are one per (sequence, head), index `seq * heads + head`: `S` is
//! row-major `d x m` fp32 at `index * d * m`, `z` is `d` fp32 at `index * d`.

use super::checks;
use crate::{Buffer, Error, FeatureMap, Result};

/// Largest key size D and value size M the kernels accept.
pub const MAX_DIM: usize = 256;

/// Element strides of one `(batch, heads, tokens, dim)` tensor; the last
/// dimension is contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Strides {
    /// Elements between consecutive batch entries.
    pub batch: usize,
    /// Elements between consecutive tokens.
    pub token: usize,
    /// Elements between consecutive heads.
    pub head: usize,
}

impl Strides {
    /// Contiguous `[B, H, N, dim]`.
    pub fn bhnd(heads: usize, tokens: usize, dim: usize) -> Self {
        Strides {
            batch: heads * tokens * dim,
            token: dim,
            head: tokens * dim,
        }
    }

    /// Contiguous `[B, N, H, dim]`.
    pub fn bnhd(heads: usize, tokens: usize, dim: usize) -> Self {
        Strides {
            batch: tokens * heads * dim,
            token: heads * dim,
            head: dim,
        }
    }
}

/// Shapes and strides of q, k (`d` wide), v and o (`m` wide).
///
/// Dense batches: `batch` sequences of `tokens` tokens each. Varlen batches:
/// `batch == 1`, `tokens` is the total, and `cu_seqlens` (passed alongside)
/// cuts the token axis into sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttentionShape {
    /// Batch entries (1 for varlen).
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// Tokens per sequence (dense) or in total (varlen).
    pub tokens: usize,
    /// Key size D (1..=256).
    pub d: usize,
    /// Value size M (1..=256).
    pub m: usize,
    /// Strides of q.
    pub q: Strides,
    /// Strides of k.
    pub k: Strides,
    /// Strides of v.
    pub v: Strides,
    /// Strides of o.
    pub o: Strides,
}

impl AttentionShape {
    /// All four tensors contiguous `[B, H, N, dim]`.
    pub fn bhnd(batch: usize, heads: usize, tokens: usize, d: usize, m: usize) -> Self {
        let (qk, vo) = (
            Strides::bhnd(heads, tokens, d),
            Strides::bhnd(heads, tokens, m),
        );
        AttentionShape {
            batch,
            heads,
            tokens,
            d,
            m,
            q: qk,
            k: qk,
            v: vo,
            o: vo,
        }
    }

    /// All four tensors contiguous `[B, N, H, dim]`.
    pub fn bnhd(batch: usize, heads: usize, tokens: usize, d: usize, m: usize) -> Self {
        let (qk, vo) = (
            Strides::bnhd(heads, tokens, d),
            Strides::bnhd(heads, tokens, m),
        );
        AttentionShape {
            batch,
            heads,
            tokens,
            d,
            m,
            q: qk,
            k: qk,
            v: vo,
            o: vo,
        }
    }

    /// Packed varlen `[total_tokens, H, dim]` tensors (use with `cu_seqlens`).
    pub fn packed(total_tokens: usize, heads: usize, d: usize, m: usize) -> Self {
        Self::bnhd(1, heads, total_tokens, d, m)
    }

    /// Elements a buffer needs for `s` over `dim` (None on overflow or past
    /// 64-bit indexing; see [`checks::span`]).
    pub(crate) fn span(&self, s: &Strides, dim: usize) -> Option<usize> {
        checks::span(
            [self.batch, self.heads, self.tokens],
            [s.batch, s.head, s.token],
            dim,
        )
    }

    /// Whether rows of `dim` elements at strides `s` never share an element
    /// ([`checks::rows_disjoint`]).
    pub(crate) fn rows_disjoint(&self, s: &Strides, dim: usize) -> bool {
        checks::rows_disjoint(
            &[
                (self.batch, s.batch),
                (self.heads, s.head),
                (self.tokens, s.token),
            ],
            dim,
        )
    }
}

/// How the causal forward spreads work (the walk/split policy of
/// `ops::tuning::forward::schedule`, described in `docs/kernels.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ScheduleChoice {
    /// Let the policy decide from the shape.
    #[default]
    Auto,
    /// One block per (sequence-head, value tile) walks every chunk in order.
    Walk,
    /// Cut every sequence into (up to) this many partitions: partition
    /// states, a fixed-order prefix combine, then all partitions in parallel.
    Split {
        /// Partitions per sequence (>= 1; capped by the number of chunks).
        parts: usize,
    },
}

/// How the f16/bf16 backward rounds the fp32 state S (and the row terms
/// `B' = G . (v_j - o_i)`) where they feed dq; f32 calls ignore it.
///
/// dq_i is proportional to `sum_{j<=i} (G_i . (v_j - o_i)) phi(k_j)`; the
/// kernels form it as `G_i S_i^T / den_i + dden_i z_i` plus the chunk's
/// `B' kh`, whose parts cancel to ~1/mu of their size when q, k ~ N(mu, 1)
/// (every score of a row nearly equal), so a relative rounding e of S or B'
/// becomes ~mu e in dq (`docs/kernels.md`, "dq accuracy"). Costs in
/// tensor-core MACs: `docs/benchmarks.md`, "Backward".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DqPrecision {
    /// Two 16-bit copies, `S = S_hi + S_lo` and `B' = B'_hi + B'_lo`, and
    /// two tensor-core products each: S reaches dq to ~2^-17 relative, and
    /// dq stays under 1e-2 relative L2 error for q, k ~ N(mu, 1) up to
    /// mu = 40 in both 16-bit types. The default: it is the documented
    /// accuracy contract, and it costs the whole-head walks (D = M <= 128)
    /// no extra tensor-core MACs for S and B' (they dropped num's products
    /// to pay for it); only the tiled passes of heads past 64 state tiles (D = M =
    /// 256) pay +20.6% of their tensor work, and those passes are
    /// memory-bound (each re-reads q, k or v, dL/do per tile). On bf16
    /// tiles with elu+1 and heads up to D = 16 wide, `phi(k)` is split the
    /// same way (+23% of those heads' backward tensor work, which stays
    /// below their memory floor): wide keys (q, k ~ N(0, 10)) amplify its
    /// rounding as mu does (bf16 dq 1.85e-2 -> 2.4e-3 at D = M = 2).
    #[default]
    Split,
    /// One 16-bit copy (the high half): one product each, saving
    /// `G S_lo^T`, `B'_lo kh` and, on small bf16-tile heads, phi(k)'s low
    /// half (prepdq: 19,456 of 61,440 MACs per
    /// token-head at D = M = 128; tiled D = M = 256: 135,168 of 790,528).
    /// dq's relative L2 error then grows with mu: worst of 100 seeds
    /// (emulator, D = M = 64 and 256, causal and non-causal) bf16 1.5e-2
    /// at mu = 5 and 1.05e-1 at mu = 40, f16 2.0e-3 and 1.4e-2 (Split:
    /// at most 6.0e-3; `docs/kernels.md`, "dq accuracy"). dk, dv and dS0
    /// barely move; dz0 (a sum of `qn (G . o)`) reached 1.0e-2 for bf16
    /// at mu = 40 (Split 2.2e-5).
    Single,
}

/// Which 16-bit tensor-core tiles an f16 call stages its operands in
/// (`phi(q)`, `phi(k)`, v, the state copy, scores, dL/do); f32 and bf16
/// calls ignore it (f32 runs no tensor cores, bf16 always uses bf16 tiles).
/// Inputs and outputs stay f16 either way; every sum stays fp32.
///
/// Both tile types are 2 bytes: shared memory, tiling and launch plans are
/// the same, only the kernels differ (`forward_f16` or
/// `forward_f16_bf16tc`, and likewise for each backward pass).
/// Precision and range: `docs/kernels.md`, "f16 inputs on bf16 tiles";
/// measured errors: `docs/benchmarks.md`, "f16 on bf16 tiles".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum F16Tiles {
    /// f16 tiles: staged values round to 2^-12 relative (11 bits), with
    /// per-tile and per-row power-of-two scaling keeping them inside f16's
    /// range. The default: finer, and the accuracy contract of dq at
    /// q, k ~ N(mu, 1) for mu >= 5 relies on it. Its limit: elu+1 features
    /// of keys below about -9.7 (phi(k) = exp(k) < 2^-14) are f16
    /// subnormals with fewer significant bits, and below about -17 (2^-24)
    /// they stage as 0. Rows whose weight sits on such keys lose accuracy
    /// (keys ~ N(-14, 0.3), D = M = 8: dq 6.5e-2) and then their
    /// denominator (o and dq wrong by orders of magnitude).
    #[default]
    F16,
    /// bf16 tiles: fp32's exponent range, so no staged value under- or
    /// overflows, at 2^-9 relative rounding (8 bits; the arithmetic bf16
    /// inputs get). Pick it for f16 inputs whose elu+1 keys can fall below
    /// about -10 (e.g. q, k ~ N(0, 10)), where f16 tiles lose accuracy and
    /// then can be wrong by orders of magnitude. Errors grow to bf16's
    /// (relative L2, q, k ~ N(0, 1), D = M = 64, causal: o ~2.6e-3, dq,
    /// dk, dv up to ~3e-3, with or without `d_final`). The backward's
    /// whole-head walks (heads up to 64 state tiles, D = M = 128
    /// included) keep v and dL/do exact, as two bf16 halves each, at
    /// +65% of their tensor-core work (no extra memory): the gradients
    /// that cancel (dz0, dq of small heads at q, k ~ N(0, 10)) reached
    /// 1e-2 to 1e-1 in a few percent of such draws when v and dL/do were
    /// rounded to 8 bits. The forward walk keeps v exact too (+50% of its
    /// tensor work); the tiled backward passes (heads past 64 state
    /// tiles) still round v and dL/do, at no extra work. Not for small
    /// heads with nearly equal keys (q, k ~ N(10, 1), D = M = 2) and a
    /// `d_final`: there dv missed 1e-2 in ~2% of draws (f16 tiles: none).
    /// A caller who accepts 8 bits for v and dL/do too converts the
    /// inputs to bf16.
    Bf16,
}

/// Options of the forward kernels, the decode step and the backward.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionOptions {
    /// phi applied to q and k.
    pub feature_map: FeatureMap,
    /// Divide by `s phi(q)^T z + eps` (false: the numerator alone).
    ///
    /// Normalised outputs with elu+1 or relu are convex combinations of
    /// values, so within the input's range whatever the size of q, k and
    /// `scale`. The numerator alone, `s phi(q)^T S`, grows with the sequence
    /// and can exceed the output type's range (f16: 65,504): such elements
    /// come out as the infinity of their sign (the correct rounding), while
    /// every element whose exact value fits is finite.
    pub normalize: bool,
    /// Keeps the denominator away from zero (default 1e-6): finite and >= 0,
    /// and > 0 when `normalize` (eps = 0 is an `InvalidArgument` error there,
    /// for the forward, the backward and the decode step alike: relu with
    /// all-negative keys makes a zero denominator routine).
    pub eps: f32,
    /// The scale `s` on phi(q) (default 1.0).
    pub scale: f32,
    /// Walk or split: the forward kernels, and the backward's whole-head
    /// walks (`ops::tuning::backward::split_schedule`).
    pub schedule: ScheduleChoice,
    /// The backward's 16-bit rounding of the state where it feeds dq
    /// (default [`DqPrecision::Split`]); forward and decode ignore it.
    pub dq_precision: DqPrecision,
    /// The tensor-core tile type of f16 calls (default [`F16Tiles::F16`]),
    /// forward and backward; f32 and bf16 calls and the decode step
    /// (fp32 FMA) ignore it.
    pub f16_tiles: F16Tiles,
}

impl Default for AttentionOptions {
    fn default() -> Self {
        AttentionOptions {
            feature_map: FeatureMap::EluPlusOne,
            normalize: true,
            eps: 1e-6,
            scale: 1.0,
            schedule: ScheduleChoice::Auto,
            dq_precision: DqPrecision::Split,
            f16_tiles: F16Tiles::F16,
        }
    }
}

impl AttentionOptions {
    pub(crate) fn check(&self, kernel: &'static str) -> Result<()> {
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(Error::invalid(
                kernel,
                "opts.eps",
                format!("eps = {}; expected a finite number >= 0", self.eps),
            ));
        }
        // A zero denominator is routine without eps (relu with all-negative
        // keys, an empty prefix): with normalize, eps must keep it away.
        if self.normalize && self.eps == 0.0 {
            return Err(Error::invalid(
                kernel,
                "opts.eps",
                "eps = 0 with normalize = true; expected eps > 0 (o = num / (den + eps) \
                 divides by zero wherever s phi(q)^T z = 0)",
            ));
        }
        if !self.scale.is_finite() {
            return Err(Error::invalid(
                kernel,
                "opts.scale",
                format!("scale = {}; expected a finite number", self.scale),
            ));
        }
        if let ScheduleChoice::Split { parts: 0 } = self.schedule {
            return Err(Error::invalid(
                kernel,
                "opts.schedule",
                "Split { parts: 0 }: at least one partition",
            ));
        }
        Ok(())
    }
}

/// Causal (prefix sums) or non-causal (every query sees the whole sequence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The params' `causal = 1` (same kernels as [`Kind::NonCausal`]).
    Causal,
    /// The params' `causal = 0`.
    NonCausal,
}

/// q, k and v of a call.
#[derive(Debug, Clone, Copy)]
pub struct Qkv<'a, B> {
    /// Queries, `d` wide.
    pub q: &'a B,
    /// Keys, `d` wide.
    pub k: &'a B,
    /// Values, `m` wide.
    pub v: &'a B,
}

/// A read-only state pair (fp32 S and z).
#[derive(Debug)]
pub struct StateRef<'a, B> {
    /// S, `states * d * m`.
    pub s: &'a B,
    /// z, `states * d`.
    pub z: &'a B,
}

/// A writable state pair (fp32 S and z).
#[derive(Debug)]
pub struct StateMut<'a, B> {
    /// S, `states * d * m`.
    pub s: &'a mut B,
    /// z, `states * d`.
    pub z: &'a mut B,
}

/// The optional initial state read and final state written by a call.
#[derive(Debug)]
pub struct StateIo<'a, I, F> {
    /// Start from this state (zeros when `None`).
    pub initial: Option<StateRef<'a, I>>,
    /// Write the state after the last token here.
    pub final_state: Option<StateMut<'a, F>>,
}

impl<'a, F> StateIo<'a, F, F> {
    /// No initial state (zeros), the final state written to `f`.
    pub fn final_only(f: StateMut<'a, F>) -> Self {
        StateIo {
            initial: None,
            final_state: Some(f),
        }
    }
}

impl StateIo<'_, Buffer<f32>, Buffer<f32>> {
    /// No initial state, no final state (for [`crate::Device`] calls; with
    /// cudarc memory write `StateIo::<CudaSlice<f32>, CudaSlice<f32>> {
    /// initial: None, final_state: None }`).
    pub fn none() -> Self {
        StateIo {
            initial: None,
            final_state: None,
        }
    }
}
