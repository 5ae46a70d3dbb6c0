//! Linear attention backward in constant memory: one forward prefix sweep and
//! one reverse suffix sweep per head, never an N x N matrix.
//!
//! With `qh_i = s phi(q_i)`, `kh_j = phi(k_j)`, `num_i = S_i^T qh_i`,
//! `den_i = qh_i . z_i + eps` and `G_i = dL/do_i`:
//!
//! ```text
//! d num_i = G_i / den_i                 (G_i when not normalising)
//! d den_i = -(G_i . o_i) / den_i        (0 when not normalising)
//! d qh_i  = S_i d num_i + d den_i z_i
//! dS~_j   = dS_N + sum_{i>=j} qh_i d num_i^T   (suffix sums; i over all when non-causal)
//! dz~_j   = dz_N + sum_{i>=j} d den_i qh_i
//! d kh_j  = dS~_j v_j + dz~_j ;  d v_j = dS~_j^T kh_j
//! dS0     = dS~_0 ;  dz0 = dz~_0
//! dq_i = s phi'(q_i) * d qh_i ;  dk_j = phi'(k_j) * d kh_j
//! ```
//!
//! `dS_N`, `dz_N` are optional gradients flowing into the final state.

use crate::error::ReferenceError;
use crate::error::Result;
use crate::kernels::{axpy, dot};
use crate::layout::shape_str;
use crate::layout::{Layout, Tensor, View};
use crate::linear::{check_cu_seqlens, check_packed, check_qkv, initial_states, Opt, Seq};
use crate::options::LinearAttentionOptions;
use crate::real::Real;
use crate::state::{check_states, State};

/// Gradients of a linear-attention call with respect to all of its inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients<T> {
    /// dL/dq, laid out like the forward output but with dim D.
    pub dq: Tensor<T>,
    /// dL/dk, same layout as `dq`.
    pub dk: Tensor<T>,
    /// dL/dv, dim M.
    pub dv: Tensor<T>,
    /// dL/dS0 and dL/dz0 per head (same indexing as the initial states);
    /// returned even when no initial state was given (then it is the
    /// gradient at S0 = 0, z0 = 0).
    pub d_initial: Vec<State<T>>,
}

/// Builds an output layout from (batch, heads, tokens, dim).
type MakeLayout = fn(usize, usize, usize, usize) -> Layout;

struct GradOut<'a, T> {
    dq: &'a mut Tensor<T>,
    dk: &'a mut Tensor<T>,
    dv: &'a mut Tensor<T>,
}

/// `(d num_i, d den_i)` into `dnum`, returns `d den_i`; `num` is scratch.
#[inline(always)]
fn head_grads<T: Real>(
    st: &State<T>,
    qh: &[T],
    g: &[T],
    o: &Opt<T>,
    num: &mut [T],
    dnum: &mut [T],
) -> T {
    if !o.normalize {
        dnum.copy_from_slice(g);
        return T::ZERO;
    }
    num.fill(T::ZERO);
    for (srow, &qd) in st.s.chunks_exact(st.m).zip(qh) {
        axpy(num, qd, srow);
    }
    let den = dot(qh, &st.z) + o.eps;
    for (dn, &gi) in dnum.iter_mut().zip(g) {
        *dn = gi / den;
    }
    // d den = -(G . num) / den^2 = -(G . o) / den.
    -(dot(g, num) / den) / den
}

/// `d qh = S dnum + dden z`, then `dq = s phi'(q) * d qh` into `dq`.
#[inline(always)]
fn write_dq<T: Real>(st: &State<T>, q: &[T], dnum: &[T], dden: T, o: &Opt<T>, dq: &mut [T]) {
    for (((dqd, srow), &zd), &qd) in dq.iter_mut().zip(st.s.chunks_exact(st.m)).zip(&st.z).zip(q) {
        let dqh = dot(srow, dnum) + dden * zd;
        *dqd = o.scale * o.fm.derivative(qd) * dqh;
    }
}

/// `acc.s += qh dnum^T; acc.z += dden qh`.
#[inline(always)]
fn accumulate<T: Real>(acc: &mut State<T>, qh: &[T], dnum: &[T], dden: T) {
    let m = acc.m;
    for ((srow, zd), &qd) in acc.s.chunks_exact_mut(m).zip(acc.z.iter_mut()).zip(qh) {
        axpy(srow, qd, dnum);
        *zd += dden * qd;
    }
}

/// `dk = phi'(k) * (dS v + dz)`, `dv = dS^T kh`.
#[inline(always)]
fn write_dkv<T: Real>(acc: &State<T>, k: &[T], v: &[T], o: &Opt<T>, dk: &mut [T], dv: &mut [T]) {
    dv.fill(T::ZERO);
    for (((dkd, srow), &zd), &kd) in dk
        .iter_mut()
        .zip(acc.s.chunks_exact(acc.m))
        .zip(&acc.z)
        .zip(k)
    {
        let dkh = dot(srow, v) + zd;
        *dkd = o.fm.derivative(kd) * dkh;
        axpy(dv, o.fm.apply(kd), srow);
    }
}

/// Backward for one sequence. `st` enters as the initial state (clobbered);
/// `acc` enters as the final-state gradient and leaves as the initial-state
/// gradient.
fn backward_seq<T: Real>(
    causal: bool,
    x: &Seq<T>,
    g: &View<T>,
    o: &Opt<T>,
    st: &mut State<T>,
    acc: &mut State<T>,
    out: &mut GradOut<T>,
) {
    let (d, m) = (st.d, st.m);
    let (b, h) = (x.b, x.h);
    let n = x.t1 - x.t0;
    let mut qh = vec![T::ZERO; d];
    let mut kh = vec![T::ZERO; d];
    let mut num = vec![T::ZERO; m];
    // d num_i (M per token) and d den_i, kept for the reverse sweep: O(N M).
    let mut dnums = vec![T::ZERO; n * m];
    let mut ddens = vec![T::ZERO; n];
    let absorb = |st: &mut State<T>, kh: &[T], v: &[T]| {
        for ((srow, &kd), zd) in st.s.chunks_exact_mut(m).zip(kh).zip(st.z.iter_mut()) {
            axpy(srow, kd, v);
            *zd += kd;
        }
    };
    if !causal {
        for t in x.t0..x.t1 {
            o.fm.apply_into(x.k.r(b, h, t), T::ONE, &mut kh);
            absorb(st, &kh, x.v.r(b, h, t));
        }
    }
    // Forward sweep: prefix states, d qh_i.
    for (i, t) in (x.t0..x.t1).enumerate() {
        if causal {
            o.fm.apply_into(x.k.r(b, h, t), T::ONE, &mut kh);
            absorb(st, &kh, x.v.r(b, h, t));
        }
        let qrow = x.q.r(b, h, t);
        o.fm.apply_into(qrow, o.scale, &mut qh);
        let dnum = &mut dnums[i * m..(i + 1) * m];
        let dden = head_grads(st, &qh, g.r(b, h, t), o, &mut num, dnum);
        ddens[i] = dden;
        write_dq(st, qrow, dnum, dden, o, out.dq.row_mut(b, h, t));
        if !causal {
            accumulate(acc, &qh, dnum, dden);
        }
    }
    // Reverse sweep: suffix sums of qh dnum^T and dden qh.
    for (i, t) in (x.t0..x.t1).enumerate().rev() {
        if causal {
            o.fm.apply_into(x.q.r(b, h, t), o.scale, &mut qh);
            accumulate(acc, &qh, &dnums[i * m..(i + 1) * m], ddens[i]);
        }
        write_dkv(
            acc,
            x.k.r(b, h, t),
            x.v.r(b, h, t),
            o,
            out.dk.row_mut(b, h, t),
            out.dv.row_mut(b, h, t),
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn backward<T: Real>(
    func: &'static str,
    causal: bool,
    q: View<T>,
    k: View<T>,
    v: View<T>,
    d_out: View<T>,
    cu_seqlens: Option<&[usize]>,
    opts: &LinearAttentionOptions,
    initial: Option<&[State<T>]>,
    d_final: Option<&[State<T>]>,
) -> Result<Gradients<T>> {
    let o = Opt::new(opts, func)?;
    let (d, m) = check_qkv(func, &q, &k, &v)?;
    let l = *q.layout();
    let lg = d_out.layout();
    if !lg.same_rows(&l) || lg.dim != m {
        return Err(ReferenceError::ShapeMismatch {
            func,
            arg: "d_out",
            expected: format!(
                "shape (batch {}, heads {}, tokens {}, dim {m}) (the output's)",
                l.batch, l.heads, l.tokens
            ),
            found: shape_str(lg),
        });
    }
    let (ranges, mk): (Vec<(usize, usize)>, MakeLayout) = match cu_seqlens {
        Some(cu) => {
            check_packed(func, &q)?;
            check_cu_seqlens(func, cu, l.tokens)?;
            (
                cu.windows(2).map(|w| (w[0], w[1])).collect(),
                |_, h, n, dim| Layout::packed(n, h, dim),
            )
        }
        None => ((0..l.batch).map(|_| (0, l.tokens)).collect(), Layout::bhnd),
    };
    let count = ranges.len() * l.heads;
    let mut states = initial_states(func, initial, count, d, m)?;
    let mut accs = match d_final {
        Some(s) => {
            check_states(s, func, "d_final", count, d, m)?;
            s.to_vec()
        }
        None => State::zeros_vec(count, d, m),
    };
    let mut dq = Tensor::zeros(mk(l.batch, l.heads, l.tokens, d))?;
    let mut dk = Tensor::zeros(mk(l.batch, l.heads, l.tokens, d))?;
    let mut dv = Tensor::zeros(mk(l.batch, l.heads, l.tokens, m))?;
    let mut out = GradOut {
        dq: &mut dq,
        dk: &mut dk,
        dv: &mut dv,
    };
    let varlen = cu_seqlens.is_some();
    for (s, &(t0, t1)) in ranges.iter().enumerate() {
        for h in 0..l.heads {
            let x = Seq {
                q,
                k,
                v,
                b: if varlen { 0 } else { s },
                h,
                t0,
                t1,
            };
            let i = s * l.heads + h;
            backward_seq(
                causal,
                &x,
                &d_out,
                &o,
                &mut states[i],
                &mut accs[i],
                &mut out,
            );
        }
    }
    Ok(Gradients {
        dq,
        dk,
        dv,
        d_initial: accs,
    })
}

/// Gradients of [`causal_linear_attention`](crate::causal_linear_attention)
/// given `d_out = dL/do` (shape (B, H, N, M), any strides).
///
/// `initial` is the forward's initial state (zeros when `None`); `d_final`
/// optionally adds a gradient flowing into the returned final states. Returns
/// dq, dk (`[B, H, N, D]`), dv (`[B, H, N, M]`) and dS0, dz0 per head.
#[allow(clippy::too_many_arguments)]
pub fn causal_linear_attention_backward<T: Real>(
    q: View<T>,
    k: View<T>,
    v: View<T>,
    d_out: View<T>,
    opts: &LinearAttentionOptions,
    initial: Option<&[State<T>]>,
    d_final: Option<&[State<T>]>,
) -> Result<Gradients<T>> {
    backward(
        "causal_linear_attention_backward",
        true,
        q,
        k,
        v,
        d_out,
        None,
        opts,
        initial,
        d_final,
    )
}

/// Gradients of [`linear_attention`](crate::linear_attention) (non-causal);
/// conventions as [`causal_linear_attention_backward`].
#[allow(clippy::too_many_arguments)]
pub fn linear_attention_backward<T: Real>(
    q: View<T>,
    k: View<T>,
    v: View<T>,
    d_out: View<T>,
    opts: &LinearAttentionOptions,
    initial: Option<&[State<T>]>,
    d_final: Option<&[State<T>]>,
) -> Result<Gradients<T>> {
    backward(
        "linear_attention_backward",
        false,
        q,
        k,
        v,
        d_out,
        None,
        opts,
        initial,
        d_final,
    )
}

/// Gradients of
/// [`varlen_causal_linear_attention`](crate::varlen_causal_linear_attention):
/// packed `[total_tokens, H, dim]` inputs and outputs, states per
/// (sequence, head) indexed `s * H + h`.
#[allow(clippy::too_many_arguments)]
pub fn varlen_causal_linear_attention_backward<T: Real>(
    q: View<T>,
    k: View<T>,
    v: View<T>,
    d_out: View<T>,
    cu_seqlens: &[usize],
    opts: &LinearAttentionOptions,
    initial: Option<&[State<T>]>,
    d_final: Option<&[State<T>]>,
) -> Result<Gradients<T>> {
    backward(
        "varlen_causal_linear_attention_backward",
        true,
        q,
        k,
        v,
        d_out,
        Some(cu_seqlens),
        opts,
        initial,
        d_final,
    )
}
