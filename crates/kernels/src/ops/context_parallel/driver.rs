//! The [`Collective`] an engine provides (an all-gather of fp32 buffers),
//! the in-process one for tests ([`InProcess`]), and the [`ContextParallel`]
//! driver running one rank's forward and backward over it.

use std::sync::{Arc, Barrier, Mutex};

use super::{add_state_gradient, combine_states, local_state, noncausal_readout, StateLayout};
use crate::ops::attention::{AttentionOptions, AttentionShape, F16Tiles, Kind};
use crate::ops::backward::{
    self as bwd, backward_raw, BackwardInputs, GradLens, Grads, RawBackward,
};
use crate::ops::forward::{self as fwd, forward_raw, Lens, RawForward};
use crate::ops::memory::{Addrs, Memory};
use crate::plan::Executor;
use crate::{Buffer, DType, Device, Element, Error, Result};

const OP: &str = "context_parallel";

/// An all-gather of fp32 buffers among `ranks()` participants.
///
/// `all_gather` must leave in `recv` every rank's `send`, rank order
/// (`recv[r * n..(r + 1) * n]` = rank r's `send`, `n = send.len()`),
/// ordered after the work already queued on `dev` and before the work
/// queued after it (on a GPU: on the device's stream, or synchronised with
/// it). Every rank calls it with the same `n`; an implementation returns
/// an error rather than hanging when it can tell otherwise.
pub trait Collective {
    /// This participant's index, `0..ranks()`.
    fn rank(&self) -> usize;
    /// Participants.
    fn ranks(&self) -> usize;
    /// The all-gather (see the trait doc). `recv.len()` must be
    /// `ranks() * send.len()` ([`Error::InvalidArgument`] otherwise).
    fn all_gather(&self, dev: &Device, send: &Buffer<f32>, recv: &mut Buffer<f32>) -> Result<()>;

    /// Whether `dev` can take part in [`all_gather`](Self::all_gather)
    /// (e.g. NCCL: a GPU on the communicator's stream). Checked by the
    /// driver before any exchange, as part of the rank's own validation.
    /// Default: any device.
    fn check(&self, dev: &Device) -> Result<()> {
        let _ = dev;
        Ok(())
    }

    /// Gathers a small host array from every rank (rank order), through
    /// the collective's own resources where it has them, so that a rank
    /// whose `dev` failed [`check`](Self::check) still joins: the driver
    /// exchanges its call descriptors this way. Default: `all_gather` on
    /// `dev` (the in-process collective cannot strand a rank either way).
    fn all_gather_host(&self, dev: &Device, send: &[f32]) -> Result<Vec<f32>> {
        let s = dev.upload(send)?;
        let mut r = dev.alloc_zeros::<f32>(send.len() * self.ranks())?;
        self.all_gather(dev, &s, &mut r)?;
        dev.download(&r)
    }
}

struct Shared {
    barrier: Barrier,
    slots: Mutex<Vec<Option<Vec<f32>>>>,
}

/// A [`Collective`] among threads of one process (one [`Device`] each, e.g.
/// an emulator per rank): a [`Barrier`] and a [`Mutex`]-guarded slot per
/// rank, data through host memory. For tests and examples.
///
/// Every rank validates its own call and deposits either its data or a
/// failure marker before the rendezvous, so a size mismatch or a rank's
/// error makes every rank return an error instead of waiting forever.
pub struct InProcess {
    rank: usize,
    ranks: usize,
    shared: Arc<Shared>,
}

impl InProcess {
    /// `ranks` connected participants (hand one to each thread).
    /// Errors: [`Error::InvalidArgument`] for `ranks == 0`.
    pub fn group(ranks: usize) -> Result<Vec<InProcess>> {
        if ranks == 0 {
            return Err(Error::invalid(
                "InProcess::group",
                "ranks",
                "at least one rank",
            ));
        }
        let shared = Arc::new(Shared {
            barrier: Barrier::new(ranks),
            slots: Mutex::new(vec![None; ranks]),
        });
        Ok((0..ranks)
            .map(|rank| InProcess {
                rank,
                ranks,
                shared: shared.clone(),
            })
            .collect())
    }
}

impl Collective for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }

    fn ranks(&self) -> usize {
        self.ranks
    }

    fn all_gather(&self, dev: &Device, send: &Buffer<f32>, recv: &mut Buffer<f32>) -> Result<()> {
        let n = send.len();
        let local: Result<Vec<f32>> = if recv.len() != self.ranks * n {
            Err(Error::invalid(
                "all_gather",
                "recv",
                format!(
                    "expected {} x {n} = {} fp32 elements, found {}",
                    self.ranks,
                    self.ranks * n,
                    recv.len()
                ),
            ))
        } else {
            dev.download(send)
        };
        fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Vec<Option<Vec<f32>>>> {
            s.slots
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        }
        lock(&self.shared)[self.rank] = local.as_ref().ok().cloned();
        self.shared.barrier.wait();
        let gathered: std::result::Result<Vec<f32>, String> = {
            let slots = lock(&self.shared);
            match slots
                .iter()
                .position(|s| s.as_ref().is_none_or(|v| v.len() != n))
            {
                Some(r) => Err(match &slots[r] {
                    None => format!("rank {r} failed before the exchange"),
                    Some(v) => format!("rank {r} sent {} fp32 elements, this rank {n}", v.len()),
                }),
                None => Ok(slots.iter().flatten().flatten().copied().collect()),
            }
        };
        // Nobody refills a slot before every rank has read them all.
        self.shared.barrier.wait();
        local?;
        let all = gathered.map_err(|why| Error::invalid("all_gather", "send", why))?;
        *recv = dev.upload(&all)?;
        Ok(())
    }
}

/// The varlen offsets of the piece `[start, end)` of a packed batch with
/// offsets `cu_seqlens`: the same `num_seqs` sequences, each cut to the
/// piece (a sequence the piece does not touch has length 0), as the piece's
/// own `cu_seqlens` (from 0 to `end - start`).
/// Errors: [`Error::InvalidArgument`] if `start > end` or `end` exceeds the
/// last offset, or the offsets are not non-decreasing from 0.
pub fn piece_offsets(cu_seqlens: &[usize], start: usize, end: usize) -> Result<Vec<usize>> {
    let total = cu_seqlens.last().copied().unwrap_or(0);
    if cu_seqlens.len() < 2 || cu_seqlens[0] != 0 || cu_seqlens.windows(2).any(|w| w[1] < w[0]) {
        return Err(Error::invalid(
            "piece_offsets",
            "cu_seqlens",
            "expected non-decreasing offsets from 0 (at least two entries)",
        ));
    }
    if start > end || end > total {
        return Err(Error::invalid(
            "piece_offsets",
            "start..end",
            format!("{start}..{end} is not a range within 0..{total}"),
        ));
    }
    Ok(cu_seqlens
        .iter()
        .map(|&c| c.clamp(start, end) - start)
        .collect())
}

/// One rank's piece: q, k, v (its tokens), the piece's shape and varlen
/// offsets ([`piece_offsets`]; every rank has the same number of sequences).
#[derive(Debug)]
pub struct PieceInputs<'a, T> {
    /// Queries of the piece, `d` wide.
    pub q: &'a Buffer<T>,
    /// Keys, `d` wide.
    pub k: &'a Buffer<T>,
    /// Values, `m` wide.
    pub v: &'a Buffer<T>,
    /// The piece's shape (`tokens` = the piece's tokens).
    pub shape: &'a AttentionShape,
    /// The piece's offsets for a packed varlen batch.
    pub cu_seqlens: Option<&'a [usize]>,
}

impl<T> Clone for PieceInputs<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for PieceInputs<'_, T> {}

/// What the forward of a piece keeps for its backward: the packed state the
/// piece's own kernels start from (causal: the whole sequence's initial
/// plus every earlier rank's local state; non-causal: the initial plus every
/// *other* rank's local state, so that the piece's non-causal total is the
/// whole sequence's).
#[derive(Debug)]
pub struct PieceStart {
    /// The packed state ([`StateLayout::len`] fp32).
    pub state: Buffer<f32>,
    kind: Kind,
    layout: StateLayout,
}

/// Runs one rank's forward and backward of a sequence cut into pieces, one
/// per rank of a [`Collective`] (the algorithm: `docs/context-parallel.md`).
///
/// Every rank calls [`forward`](Self::forward) (and later
/// [`backward`](Self::backward)) with its own piece and the same kind,
/// dtype, options, number of sequences, heads, d and m, and the same
/// whole-sequence initial state (and `d_final`) or none. Each call first
/// all-gathers a small descriptor of every rank's call, so bad input on any
/// rank (a failed local validation, mismatched shapes or dtypes) makes every
/// rank return [`Error::InvalidArgument`] before any state moves: with NCCL
/// nothing waits for a rank that left.
pub struct ContextParallel<C: Collective> {
    comm: C,
}

const DESC_LEN: usize = 12;

/// A call's descriptor, exchanged before any state: every value fits f32
/// exactly (checked).
///
/// Slot 9 packs `flags` (which states are given), the feature map,
/// `normalize` and `f16_tiles` (bit 9, [`F16Tiles::Bf16`]); slots 10 and 11
/// are `scale` and `eps` (f32 already), so ranks with different options
/// fail too.
fn descriptor(
    ok: bool,
    op: u32,
    kind: Kind,
    dtype: DType,
    layout: &StateLayout,
    flags: u32,
    opts: &AttentionOptions,
) -> Result<[f32; DESC_LEN]> {
    let big = 1usize << 24;
    for (arg, x) in [
        ("sequences", layout.num_seqs),
        ("heads", layout.heads),
        ("d", layout.d),
        ("m", layout.m),
    ] {
        if x >= big {
            return Err(Error::invalid(OP, arg, format!("{x} exceeds 2^24")));
        }
    }
    let dt = match dtype {
        DType::F32 => 0.0,
        DType::F16 => 1.0,
        DType::Bf16 => 2.0,
    };
    Ok([
        15.0,
        ok as u32 as f32,
        op as f32,
        (kind == Kind::Causal) as u32 as f32,
        dt,
        layout.num_seqs as f32,
        layout.heads as f32,
        layout.d as f32,
        layout.m as f32,
        (flags
            | (opts.feature_map.to_c() as u32) << 4
            | (opts.normalize as u32) << 8
            | ((opts.f16_tiles == F16Tiles::Bf16) as u32) << 9) as f32,
        opts.scale,
        opts.eps,
    ])
}

impl<C: Collective> ContextParallel<C> {
    /// A driver over `comm`. Errors: [`Error::InvalidArgument`] if `comm`
    /// reports no ranks or a rank out of range.
    pub fn new(comm: C) -> Result<Self> {
        if comm.ranks() == 0 || comm.rank() >= comm.ranks() {
            return Err(Error::invalid(
                OP,
                "comm",
                format!(
                    "rank {} of {} ranks: expected 0 <= rank < ranks",
                    comm.rank(),
                    comm.ranks()
                ),
            ));
        }
        Ok(ContextParallel { comm })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Ranks.
    pub fn ranks(&self) -> usize {
        self.comm.ranks()
    }

    /// The collective.
    pub fn collective(&self) -> &C {
        &self.comm
    }

    /// Exchanges descriptors; every rank returns an error if any rank's
    /// local check failed or the descriptors differ.
    fn agree(&self, dev: &Device, local: Result<()>, desc: Result<[f32; DESC_LEN]>) -> Result<()> {
        // A descriptor that cannot be built is this rank's error, still
        // exchanged (as "rejected") so that no other rank waits for it.
        let (local, mut d) = match desc {
            Ok(d) => (local, d),
            Err(e) => (local.and(Err(e)), [0.0; DESC_LEN]),
        };
        let local = local.and(self.comm.check(dev));
        d[1] = local.is_ok() as u32 as f32;
        let all = self.comm.all_gather_host(dev, &d)?;
        local?;
        for (r, other) in all.chunks(DESC_LEN).enumerate() {
            if other[1] != 1.0 {
                return Err(Error::invalid(
                    OP,
                    "rank",
                    format!("rank {r} rejected its call (its own error says why)"),
                ));
            }
            if other[2..] != d[2..] || other[0] != d[0] {
                return Err(Error::invalid(
                    OP,
                    "rank",
                    format!(
                        "rank {r}'s call differs from rank {}'s: [op, causal, dtype, sequences, \
                         heads, d, m, states | map << 4 | normalize << 8 | bf16 tiles << 9, scale, eps] = {:?} vs {:?}",
                        self.rank(),
                        &other[2..],
                        &d[2..]
                    ),
                ));
            }
        }
        Ok(())
    }

    /// One rank's forward: writes the piece's outputs `o` (strides of
    /// `piece.shape.o`) and returns the [`PieceStart`] its backward needs.
    ///
    /// `initial` is the whole sequence's initial state (packed,
    /// [`StateLayout::len`] fp32; zeros when `None`), the same on every rank;
    /// `final_state` (packed) receives the whole sequence's final state on
    /// every rank that asks. Launches: [`local_state`], one all-gather of
    /// `R x len` fp32, two or three [`combine_states`], then the piece's
    /// causal forward from its starting state, or for the non-causal kind
    /// [`noncausal_readout`] against the total.
    ///
    /// Errors: [`Error::InvalidArgument`] (on every rank) for bad input on
    /// any rank, driver errors from the launches or the collective.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<T: Element>(
        &self,
        dev: &Device,
        kind: Kind,
        piece: PieceInputs<'_, T>,
        o: &mut Buffer<T>,
        opts: &AttentionOptions,
        initial: Option<&Buffer<f32>>,
        final_state: Option<&mut Buffer<f32>>,
    ) -> Result<PieceStart> {
        let (shape, cu) = (piece.shape, piece.cu_seqlens);
        let layout = StateLayout::of(shape, cu);
        let flags = initial.is_some() as u32;
        let local = (|| {
            let lens = Lens {
                q: piece.q.len(),
                k: piece.k.len(),
                v: piece.v.len(),
                o: o.len(),
                initial: None,
                final_state: None,
            };
            fwd::validate(OP, T::DTYPE, shape, cu, opts, &lens, &dev.target())?;
            for (arg, b) in [
                ("initial", initial.map(|b| b.len())),
                ("final_state", final_state.as_ref().map(|b| b.len())),
            ] {
                if let Some(n) = b {
                    super::check_len(OP, arg, n, layout.len())?;
                }
            }
            Ok(())
        })();
        self.agree(
            dev,
            local,
            descriptor(true, 1, kind, T::DTYPE, &layout, flags, opts),
        )?;
        let (r, n) = (self.rank(), self.ranks());
        let len = layout.len();
        let mut mine = dev.alloc_zeros::<f32>(len)?;
        local_state(
            dev,
            piece.k,
            piece.v,
            shape,
            cu,
            opts,
            None::<&Buffer<f32>>,
            &mut mine,
        )?;
        let mut gathered = dev.alloc_zeros::<f32>(n * len)?;
        self.comm.all_gather(dev, &mine, &mut gathered)?;
        drop(mine);
        // prefix = initial + slots 0..r (slot 0 is overwritten with it).
        let mut prefix = dev.alloc_zeros::<f32>(len)?;
        combine_states(dev, &layout, &mut gathered, 0, r, initial, &mut prefix)?;
        // total = prefix + slots r..n, the single-device split's order.
        let start = match kind {
            Kind::Causal => {
                if let Some(total) = final_state {
                    combine_states(dev, &layout, &mut gathered, r, n - r, Some(&prefix), total)?;
                }
                piece_forward(dev, piece, o, opts, &prefix, &layout)?;
                prefix
            }
            Kind::NonCausal => {
                let mut own_total;
                let total: &mut Buffer<f32> = match final_state {
                    Some(f) => f,
                    None => {
                        own_total = dev.alloc_zeros::<f32>(len)?;
                        &mut own_total
                    }
                };
                combine_states(dev, &layout, &mut gathered, r, n - r, Some(&prefix), total)?;
                // Every other rank: prefix + slots r+1..n (slot r was overwritten).
                let mut others = dev.alloc_zeros::<f32>(len)?;
                combine_states(
                    dev,
                    &layout,
                    &mut gathered,
                    r + 1,
                    n - r - 1,
                    Some(&prefix),
                    &mut others,
                )?;
                noncausal_readout(dev, piece.q, o, shape, cu, opts, &*total)?;
                others
            }
        };
        Ok(PieceStart {
            state: start,
            kind,
            layout,
        })
    }

    /// One rank's backward: dq, dk, dv of the piece (strides of q, k, v)
    /// from `d_o`, dL/do of the piece's outputs (strides of o, dtype T),
    /// and on rank 0 (only) `d_initial`, the gradient of the whole sequence's
    /// initial state (packed). `start` is what this rank's forward
    /// returned; `d_final` the gradient flowing into the whole sequence's
    /// final state (packed, the same on every rank; zeros when `None`).
    ///
    /// Launches: the piece's backward with no `d_final` (its gradients from
    /// its own outputs, and its own gradient of its starting state), one
    /// all-gather of `R x len` fp32, one or two [`combine_states`] (the
    /// fixed-order exclusive suffix, causal; every other rank, non-causal),
    /// then [`add_state_gradient`] of that sum into dk and dv (skipped on
    /// the last rank of a causal call without `d_final`, which receives
    /// none), and on rank 0
    /// one more [`combine_states`] for `d_initial` (see
    /// `docs/context-parallel.md` for the derivation and the cost). Errors:
    /// as [`forward`](Self::forward), and `d_initial` given on a rank other
    /// than 0, or a `start` of another kind or layout.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<T: Element>(
        &self,
        dev: &Device,
        kind: Kind,
        piece: PieceInputs<'_, T>,
        d_o: &Buffer<T>,
        grads: Grads<'_, Buffer<T>>,
        opts: &AttentionOptions,
        start: &PieceStart,
        d_final: Option<&Buffer<f32>>,
        d_initial: Option<&mut Buffer<f32>>,
    ) -> Result<()> {
        let (shape, cu) = (piece.shape, piece.cu_seqlens);
        let layout = StateLayout::of(shape, cu);
        let flags = d_final.is_some() as u32 * 2;
        let local = (|| {
            let lens = Lens {
                q: piece.q.len(),
                k: piece.k.len(),
                v: piece.v.len(),
                o: usize::MAX,
                initial: None,
                final_state: None,
            };
            let glens = GradLens {
                d_o: d_o.len(),
                dq: grads.dq.len(),
                dk: grads.dk.len(),
                dv: grads.dv.len(),
                d_final: None,
                d_initial: None,
            };
            bwd::validate(OP, T::DTYPE, shape, cu, opts, &lens, &glens, &dev.target())?;
            if start.kind != kind || start.layout != layout {
                return Err(Error::invalid(
                    OP,
                    "start",
                    format!(
                        "the forward's start is for {:?} states of {:?}; this call is {kind:?} of {layout:?}",
                        start.kind, start.layout
                    ),
                ));
            }
            super::check_len(OP, "start", start.state.len(), layout.len())?;
            if let Some(f) = d_final {
                super::check_len(OP, "d_final", f.len(), layout.len())?;
            }
            if let Some(f) = d_initial.as_ref() {
                if self.rank() != 0 {
                    return Err(Error::invalid(
                        OP,
                        "d_initial",
                        format!(
                            "the initial state's gradient is written on rank 0; rank {} passed a buffer",
                            self.rank()
                        ),
                    ));
                }
                super::check_len(OP, "d_initial", f.len(), layout.len())?;
            }
            Ok(())
        })();
        self.agree(
            dev,
            local,
            descriptor(true, 2, kind, T::DTYPE, &layout, flags, opts),
        )?;
        let (r, n) = (self.rank(), self.ranks());
        let len = layout.len();
        let x = || BackwardInputs {
            q: piece.q,
            k: piece.k,
            v: piece.v,
            d_o,
        };
        let Grads { dq, dk, dv } = grads;
        // This piece's gradients from its own outputs, and its own gradient
        // of its starting state.
        let mut mine = dev.alloc_zeros::<f32>(len)?;
        piece_backward(
            dev,
            kind,
            x(),
            (&mut *dq, &mut *dk, &mut *dv),
            shape,
            cu,
            opts,
            &start.state,
            &mut mine,
            &layout,
        )?;
        let mut gathered = dev.alloc_zeros::<f32>(n * len)?;
        self.comm.all_gather(dev, &mine, &mut gathered)?;
        drop(mine);
        let mut incoming = dev.alloc_zeros::<f32>(len)?;
        match kind {
            // d_final of piece r: d_final + G_{r+1} + ... + G_{R-1}.
            Kind::Causal => combine_states(
                dev,
                &layout,
                &mut gathered,
                r + 1,
                n - r - 1,
                d_final,
                &mut incoming,
            )?,
            // Every other rank's G (and d_final): the gradient of the total
            // is G_r + this.
            Kind::NonCausal => {
                let mut before = dev.alloc_zeros::<f32>(len)?;
                combine_states(dev, &layout, &mut gathered, 0, r, d_final, &mut before)?;
                combine_states(
                    dev,
                    &layout,
                    &mut gathered,
                    r + 1,
                    n - r - 1,
                    Some(&before),
                    &mut incoming,
                )?;
            }
        }
        // The gradient flowing into this piece's final state reaches dk and
        // dv through its state sum only; dq does not depend on it. The last
        // piece of a causal sequence without d_final receives none (its
        // `incoming` is zero), so it skips the launch: adding zeros would
        // leave dk and dv bit for bit as they are.
        let receives = kind == Kind::NonCausal || r + 1 < n || d_final.is_some();
        if receives {
            add_state_gradient(dev, piece.k, piece.v, dk, dv, shape, cu, opts, &incoming)?;
        }
        if let Some(d_initial) = d_initial {
            // Rank 0 starts the sequence: the initial state's gradient is its
            // own G_0 (slot 0, untouched by the suffixes above, which start
            // at slot 1 on rank 0) plus what flows into its final state.
            combine_states(
                dev,
                &layout,
                &mut gathered,
                0,
                1,
                Some(&incoming),
                d_initial,
            )?;
        }
        Ok(())
    }
}

/// The causal forward of a piece from the packed state `start`.
fn piece_forward<T: Element>(
    dev: &Device,
    piece: PieceInputs<'_, T>,
    o: &mut Buffer<T>,
    opts: &AttentionOptions,
    start: &Buffer<f32>,
    layout: &StateLayout,
) -> Result<()> {
    let (shape, cu) = (piece.shape, piece.cu_seqlens);
    let kernel = "causal_forward";
    let problem = fwd::validate(
        kernel,
        T::DTYPE,
        shape,
        cu,
        opts,
        &Lens::unknown(true, false),
        &dev.target(),
    )?;
    let (_tc, cua) = dev.offsets(&problem.cu_seqlens, kernel)?;
    let ws_floats = fwd::workspace_len(Kind::Causal, &problem, opts);
    let (_tw, ws) = dev.workspace(ws_floats, kernel)?;
    let mut a = Addrs::new(dev, kernel);
    let (q, k, v) = (
        a.read(piece.q, "q")?,
        a.read(piece.k, "k")?,
        a.read(piece.v, "v")?,
    );
    let s = a.read(start, "initial")?;
    let o = a.write(o, "o")?;
    let ptrs = RawForward {
        q,
        k,
        v,
        o,
        initial_s: s,
        initial_z: s + (layout.s_len() * 4) as u64,
        final_s: 0,
        final_z: 0,
        cu_seqlens: cua,
        workspace: ws,
        workspace_len: ws_floats,
    };
    // SAFETY: typed memory of `dev`; lengths validated by the driver.
    unsafe { forward_raw(Kind::Causal, dev, T::DTYPE, &ptrs, shape, cu, opts) }
}

/// The backward of a piece from the packed state `start`, with no gradient
/// into its final state, writing its own packed `d_initial`.
#[allow(clippy::too_many_arguments)]
fn piece_backward<T: Element>(
    dev: &Device,
    kind: Kind,
    x: BackwardInputs<'_, Buffer<T>>,
    (dq, dk, dv): (&mut Buffer<T>, &mut Buffer<T>, &mut Buffer<T>),
    shape: &AttentionShape,
    cu: Option<&[usize]>,
    opts: &AttentionOptions,
    start: &Buffer<f32>,
    d_initial: &mut Buffer<f32>,
    layout: &StateLayout,
) -> Result<()> {
    let kernel = bwd::plan::op_name(kind);
    let bp = bwd::validate(
        kernel,
        T::DTYPE,
        shape,
        cu,
        opts,
        &Lens::unknown(true, false),
        &GradLens::unknown(false, true),
        &dev.target(),
    )?;
    let (_tc, cua) = dev.offsets(&bp.problem.cu_seqlens, kernel)?;
    let ws_floats = bwd::workspace_len(&bp);
    let (_tw, ws) = dev.workspace(ws_floats, kernel)?;
    let z_off = (layout.s_len() * 4) as u64;
    let mut a = Addrs::new(dev, kernel);
    let (q, k, v) = (a.read(x.q, "q")?, a.read(x.k, "k")?, a.read(x.v, "v")?);
    let d_o = a.read(x.d_o, "d_o")?;
    let s = a.read(start, "initial")?;
    let di = a.write(d_initial, "d_initial")?;
    let (dq, dk, dv) = (a.write(dq, "dq")?, a.write(dk, "dk")?, a.write(dv, "dv")?);
    let off = |p: u64| if p != 0 { p + z_off } else { 0 };
    let ptrs = RawBackward {
        q,
        k,
        v,
        d_o,
        dq,
        dk,
        dv,
        initial_s: s,
        initial_z: off(s),
        d_final_s: 0,
        d_final_z: 0,
        d_initial_s: di,
        d_initial_z: off(di),
        cu_seqlens: cua,
        workspace: ws,
        workspace_len: ws_floats,
    };
    // SAFETY: typed memory of `dev`; lengths validated by the driver.
    unsafe { backward_raw(kind, dev, T::DTYPE, &ptrs, shape, cu, opts) }
}
