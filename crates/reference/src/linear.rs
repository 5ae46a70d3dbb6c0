//! Linear attention forward: quadratic, recurrent and chunked forms, causal
//! and non-causal, dense and varlen, plus in-place decode steps.

use crate::error::{ReferenceError, Result};
use crate::kernels::{axpy, dot, sum};
use crate::layout::{shape_str, Layout, Tensor, View};
use crate::options::{FeatureMap, Form, LinearAttentionOptions};
use crate::real::Real;
use crate::state::{check_states, State};

/// Options converted to the working precision.
#[derive(Clone, Copy)]
pub(crate) struct Opt<T> {
    pub fm: FeatureMap,
    pub normalize: bool,
    pub eps: T,
    pub scale: T,
}

impl<T: Real> Opt<T> {
    pub(crate) fn new(o: &LinearAttentionOptions, func: &'static str) -> Result<Self> {
        o.check(func)?;
        Ok(Opt {
            fm: o.feature_map,
            normalize: o.normalize,
            eps: T::from_f64(o.eps),
            scale: T::from_f64(o.scale),
        })
    }
}

/// One (batch, head) sequence: rows `(b, h, t0..t1)` of q, k, v (and of the
/// output, which is indexed the same way).
#[derive(Clone, Copy)]
pub(crate) struct Seq<'a, T> {
    pub q: View<'a, T>,
    pub k: View<'a, T>,
    pub v: View<'a, T>,
    pub b: usize,
    pub h: usize,
    pub t0: usize,
    pub t1: usize,
}

/// Shape checks shared by every entry point: q and k share D, all three share
/// (batch, heads, tokens). Returns (D, M).
pub(crate) fn check_qkv<T>(
    func: &'static str,
    q: &View<T>,
    k: &View<T>,
    v: &View<T>,
) -> Result<(usize, usize)> {
    let (lq, lk, lv) = (q.layout(), k.layout(), v.layout());
    if !lk.same_rows(lq) || lk.dim != lq.dim {
        return Err(ReferenceError::ShapeMismatch {
            func,
            arg: "k",
            expected: format!("{} (the shape of q)", shape_str(lq)),
            found: shape_str(lk),
        });
    }
    if !lv.same_rows(lq) {
        return Err(ReferenceError::ShapeMismatch {
            func,
            arg: "v",
            expected: format!(
                "batch {}, heads {}, tokens {} (those of q), any dim",
                lq.batch, lq.heads, lq.tokens
            ),
            found: shape_str(lv),
        });
    }
    Ok((lq.dim, lv.dim))
}

/// Validates cumulative sequence offsets against `total` tokens; returns the
/// number of sequences.
pub(crate) fn check_cu_seqlens(func: &'static str, cu: &[usize], total: usize) -> Result<usize> {
    let bad = |detail: String| ReferenceError::InvalidOffsets {
        func,
        arg: "cu_seqlens",
        detail,
    };
    if cu.len() < 2 {
        return Err(bad(format!(
            "length {}; expected num_seqs + 1 >= 2 offsets",
            cu.len()
        )));
    }
    if cu[0] != 0 {
        return Err(bad(format!("starts at {}; expected 0", cu[0])));
    }
    for (i, w) in cu.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(bad(format!(
                "cu_seqlens[{}] = {} < cu_seqlens[{i}] = {}; expected non-decreasing offsets",
                i + 1,
                w[1],
                w[0]
            )));
        }
    }
    let last = cu[cu.len() - 1];
    if last != total {
        return Err(bad(format!(
            "ends at {last}; expected the total token count {total} of q"
        )));
    }
    Ok(cu.len() - 1)
}

/// Checks that a varlen view is packed along tokens (batch == 1).
pub(crate) fn check_packed<T>(func: &'static str, q: &View<T>) -> Result<()> {
    if q.layout().batch != 1 {
        return Err(ReferenceError::ShapeMismatch {
            func,
            arg: "q",
            expected: "batch = 1 (packed [total_tokens, H, D], see Layout::packed)".into(),
            found: shape_str(q.layout()),
        });
    }
    Ok(())
}

pub(crate) fn check_chunk(func: &'static str, form: Form) -> Result<()> {
    if let Form::Chunked { chunk: 0 } = form {
        return Err(ReferenceError::InvalidValue {
            func,
            arg: "form",
            detail: "chunk = 0; expected a chunk size >= 1".into(),
        });
    }
    Ok(())
}

/// Initial states (cloned, or zeros), checked.
pub(crate) fn initial_states<T: Real>(
    func: &'static str,
    initial: Option<&[State<T>]>,
    count: usize,
    d: usize,
    m: usize,
) -> Result<Vec<State<T>>> {
    match initial {
        Some(s) => {
            check_states(s, func, "initial", count, d, m)?;
            Ok(s.to_vec())
        }
        None => Ok(State::zeros_vec(count, d, m)),
    }
}

/// `out = S^T qh`, then divided by `qh . z + eps` when normalising.
#[inline(always)]
fn readout<T: Real>(st: &State<T>, qh: &[T], o: &Opt<T>, out: &mut [T]) {
    out.fill(T::ZERO);
    for (srow, &qd) in st.s.chunks_exact(st.m).zip(qh) {
        axpy(out, qd, srow);
    }
    if o.normalize {
        let den = dot(qh, &st.z) + o.eps;
        for x in out.iter_mut() {
            *x = *x / den;
        }
    }
}

/// `S += kh v^T; z += kh`.
#[inline(always)]
fn update<T: Real>(st: &mut State<T>, kh: &[T], v: &[T]) {
    let m = st.m;
    for ((srow, &kd), zd) in st.s.chunks_exact_mut(m).zip(kh).zip(st.z.iter_mut()) {
        axpy(srow, kd, v);
        *zd += kd;
    }
}

/// Runs one sequence in the requested form; `st` goes in as the initial state
/// and comes out as the final state.
pub(crate) fn run_seq<T: Real>(
    form: Form,
    causal: bool,
    x: &Seq<T>,
    o: &Opt<T>,
    st: &mut State<T>,
    out: &mut Tensor<T>,
) {
    match form {
        Form::Quadratic => quadratic(causal, x, o, st, out),
        Form::Recurrent => recurrent(causal, x, o, st, out),
        Form::Chunked { chunk } => chunked(causal, chunk.max(1), x, o, st, out),
    }
}

fn recurrent<T: Real>(
    causal: bool,
    x: &Seq<T>,
    o: &Opt<T>,
    st: &mut State<T>,
    out: &mut Tensor<T>,
) {
    let d = st.d;
    let (b, h) = (x.b, x.h);
    let mut qh = vec![T::ZERO; d];
    let mut kh = vec![T::ZERO; d];
    if causal {
        for t in x.t0..x.t1 {
            o.fm.apply_into(x.k.r(b, h, t), T::ONE, &mut kh);
            update(st, &kh, x.v.r(b, h, t));
            o.fm.apply_into(x.q.r(b, h, t), o.scale, &mut qh);
            readout(st, &qh, o, out.row_mut(b, h, t));
        }
    } else {
        for t in x.t0..x.t1 {
            o.fm.apply_into(x.k.r(b, h, t), T::ONE, &mut kh);
            update(st, &kh, x.v.r(b, h, t));
        }
        for t in x.t0..x.t1 {
            o.fm.apply_into(x.q.r(b, h, t), o.scale, &mut qh);
            readout(st, &qh, o, out.row_mut(b, h, t));
        }
    }
}

/// From the definition: `o_i = (qh_i^T S0 + sum_{j in mask(i)} (qh_i . kh_j) v_j)
/// / (qh_i . z0 + sum_j qh_i . kh_j + eps)`, with the final state summed directly.
fn quadratic<T: Real>(
    causal: bool,
    x: &Seq<T>,
    o: &Opt<T>,
    st: &mut State<T>,
    out: &mut Tensor<T>,
) {
    let (d, m) = (st.d, st.m);
    let (b, h) = (x.b, x.h);
    let n = x.t1 - x.t0;
    let mut khs = vec![T::ZERO; n * d];
    for (j, kh) in khs.chunks_exact_mut(d).enumerate() {
        o.fm.apply_into(x.k.r(b, h, x.t0 + j), T::ONE, kh);
    }
    let mut qh = vec![T::ZERO; d];
    let mut num = vec![T::ZERO; m];
    for i in 0..n {
        o.fm.apply_into(x.q.r(b, h, x.t0 + i), o.scale, &mut qh);
        // Contribution of the history before this sequence.
        num.fill(T::ZERO);
        for (srow, &qd) in st.s.chunks_exact(m).zip(&qh) {
            axpy(&mut num, qd, srow);
        }
        let mut den = dot(&qh, &st.z);
        let jmax = if causal { i + 1 } else { n };
        for j in 0..jmax {
            let w = dot(&qh, &khs[j * d..(j + 1) * d]);
            axpy(&mut num, w, x.v.r(b, h, x.t0 + j));
            den += w;
        }
        let row = out.row_mut(b, h, x.t0 + i);
        if o.normalize {
            let den = den + o.eps;
            for (r, &nv) in row.iter_mut().zip(&num) {
                *r = nv / den;
            }
        } else {
            row.copy_from_slice(&num);
        }
    }
    for (j, kh) in khs.chunks_exact(d).enumerate() {
        update(st, kh, x.v.r(b, h, x.t0 + j));
    }
}

/// Chunks of `c` rows: `num_R = Qh_R S_prev + mask(Qh_R Kh_R^T) V_R`,
/// `den_R = Qh_R z_prev + mask(Qh_R Kh_R^T) 1`, then the state absorbs the chunk.
/// Non-causal: the state absorbs every chunk first, then each chunk reads it.
fn chunked<T: Real>(
    causal: bool,
    c: usize,
    x: &Seq<T>,
    o: &Opt<T>,
    st: &mut State<T>,
    out: &mut Tensor<T>,
) {
    let (d, m) = (st.d, st.m);
    let (b, h) = (x.b, x.h);
    let mut qh = vec![T::ZERO; c * d];
    let mut kh = vec![T::ZERO; c * d];
    let mut vv = vec![T::ZERO; c * m];
    let mut a = vec![T::ZERO; c * c];
    let mut num = vec![T::ZERO; c * m];
    let mut den = vec![T::ZERO; c];
    let gather_kv = |c0: usize, len: usize, kh: &mut [T], vv: &mut [T]| {
        for r in 0..len {
            o.fm.apply_into(x.k.r(b, h, c0 + r), T::ONE, &mut kh[r * d..(r + 1) * d]);
            vv[r * m..(r + 1) * m].copy_from_slice(x.v.r(b, h, c0 + r));
        }
    };
    // S += Kh^T V, z += Kh^T 1, as a D x len by len x M product.
    let absorb = |st: &mut State<T>, kh: &[T], vv: &[T], len: usize| {
        for (dd, (srow, zd)) in st.s.chunks_exact_mut(m).zip(st.z.iter_mut()).enumerate() {
            for r in 0..len {
                let kv = kh[r * d + dd];
                axpy(srow, kv, &vv[r * m..(r + 1) * m]);
                *zd += kv;
            }
        }
    };
    if !causal {
        let mut c0 = x.t0;
        while c0 < x.t1 {
            let len = c.min(x.t1 - c0);
            gather_kv(c0, len, &mut kh, &mut vv);
            absorb(st, &kh, &vv, len);
            c0 += len;
        }
    }
    let mut c0 = x.t0;
    while c0 < x.t1 {
        let len = c.min(x.t1 - c0);
        for r in 0..len {
            o.fm.apply_into(x.q.r(b, h, c0 + r), o.scale, &mut qh[r * d..(r + 1) * d]);
        }
        // Inter-chunk part: Qh S_prev and Qh z_prev.
        for r in 0..len {
            let q = &qh[r * d..(r + 1) * d];
            let nr = &mut num[r * m..(r + 1) * m];
            nr.fill(T::ZERO);
            for (srow, &qd) in st.s.chunks_exact(m).zip(q) {
                axpy(nr, qd, srow);
            }
            den[r] = dot(q, &st.z);
        }
        if causal {
            gather_kv(c0, len, &mut kh, &mut vv);
            // Intra-chunk part: A = mask(Qh Kh^T), num += A V, den += A 1.
            for r in 0..len {
                let q = &qh[r * d..(r + 1) * d];
                let arow = &mut a[r * c..r * c + r + 1];
                for (j, aj) in arow.iter_mut().enumerate() {
                    *aj = dot(q, &kh[j * d..(j + 1) * d]);
                }
                let nr = &mut num[r * m..(r + 1) * m];
                for (j, &aj) in arow.iter().enumerate() {
                    axpy(nr, aj, &vv[j * m..(j + 1) * m]);
                }
                den[r] += sum(arow);
            }
        }
        for r in 0..len {
            let row = out.row_mut(b, h, c0 + r);
            let nr = &num[r * m..(r + 1) * m];
            if o.normalize {
                let dn = den[r] + o.eps;
                for (y, &nv) in row.iter_mut().zip(nr) {
                    *y = nv / dn;
                }
            } else {
                row.copy_from_slice(nr);
            }
        }
        if causal {
            absorb(st, &kh, &vv, len);
        }
        c0 += len;
    }
}

#[allow(clippy::too_many_arguments)]
fn forward<T: Real>(
    func: &'static str,
    form: Form,
    causal: bool,
    q: View<T>,
    k: View<T>,
    v: View<T>,
    opts: &LinearAttentionOptions,
    initial: Option<&[State<T>]>,
) -> Result<(Tensor<T>, Vec<State<T>>)> {
    let o = Opt::new(opts, func)?;
    check_chunk(func, form)?;
    let (d, m) = check_qkv(func, &q, &k, &v)?;
    let l = *q.layout();
    let mut states = initial_states(func, initial, l.batch * l.heads, d, m)?;
    let mut out = Tensor::zeros(Layout::bhnd(l.batch, l.heads, l.tokens, m))?;
    for b in 0..l.batch {
        for h in 0..l.heads {
            let x = Seq {
                q,
                k,
                v,
                b,
                h,
                t0: 0,
                t1: l.tokens,
            };
            run_seq(form, causal, &x, &o, &mut states[b * l.heads + h], &mut out);
        }
    }
    Ok((out, states))
}

#[allow(clippy::too_many_arguments)]
fn forward_varlen<T: Real>(
    func: &'static str,
    causal: bool,
    q: View<T>,
    k: View<T>,
    v: View<T>,
    cu_seqlens: &[usize],
    opts: &LinearAttentionOptions,
    initial: Option<&[State<T>]>,
) -> Result<(Tensor<T>, Vec<State<T>>)> {
    let o = Opt::new(opts, func)?;
    let (d, m) = check_qkv(func, &q, &k, &v)?;
    check_packed(func, &q)?;
    let l = *q.layout();
    let nseq = check_cu_seqlens(func, cu_seqlens, l.tokens)?;
    let mut states = initial_states(func, initial, nseq * l.heads, d, m)?;
    let mut out = Tensor::zeros(Layout::packed(l.tokens, l.heads, m))?;
    for (s, w) in cu_seqlens.windows(2).enumerate() {
        for h in 0..l.heads {
            let x = Seq {
                q,
                k,
                v,
                b: 0,
                h,
                t0: w[0],
                t1: w[1],
            };
            run_seq(
                Form::Recurrent,
                causal,
                &x,
                &o,
                &mut states[s * l.heads + h],
                &mut out,
            );
        }
    }
    Ok((out, states))
}

/// Causal linear attention (recurrent form), the crate's ground truth:
/// `o_i = s phi(q_i)^T S_i / (s phi(q_i)^T z_i + eps)` with
/// `S_i = S0 + sum_{j<=i} phi(k_j) v_j^T`, `z_i = z0 + sum_{j<=i} phi(k_j)`.
///
/// `q`, `k` are (B, H, N, D) and `v` (B, H, N, M) in any strides. `initial`
/// holds B*H states indexed `b * H + h` (zeros when `None`). Returns the output
/// as contiguous `[B, H, N, M]` ([`Layout::bhnd`]) and the B*H final states.
pub fn causal_linear_attention<T: Real>(
    q: View<T>,
    k: View<T>,
    v: View<T>,
    opts: &LinearAttentionOptions,
    initial: Option<&[State<T>]>,
) -> Result<(Tensor<T>, Vec<State<T>>)> {
    forward(
        "causal_linear_attention",
        Form::Recurrent,
        true,
        q,
        k,
        v,
        opts,
        initial,
    )
}

/// [`causal_linear_attention`] computed by the chosen [`Form`]; every form
/// gives the same result, which is how they check one another.
pub fn causal_linear_attention_with<T: Real>(
    form: Form,
    q: View<T>,
    k: View<T>,
    v: View<T>,
    opts: &LinearAttentionOptions,
    initial: Option<&[State<T>]>,
) -> Result<(Tensor<T>, Vec<State<T>>)> {
    forward(
        "causal_linear_attention_with",
        form,
        true,
        q,
        k,
        v,
        opts,
        initial,
    )
}

/// Non-causal linear attention: every query sees the whole sequence,
/// `S = S0 + sum_j phi(k_j) v_j^T`, `o_i = s phi(q_i)^T S / (s phi(q_i)^T z + eps)`.
///
/// Same shapes, output layout and state conventions as
/// [`causal_linear_attention`]; the returned states are `S` and `z`.
pub fn linear_attention<T: Real>(
    q: View<T>,
    k: View<T>,
    v: View<T>,
    opts: &LinearAttentionOptions,
    initial: Option<&[State<T>]>,
) -> Result<(Tensor<T>, Vec<State<T>>)> {
    forward(
        "linear_attention",
        Form::Recurrent,
        false,
        q,
        k,
        v,
        opts,
        initial,
    )
}

/// [`linear_attention`] computed by the chosen [`Form`].
pub fn linear_attention_with<T: Real>(
    form: Form,
    q: View<T>,
    k: View<T>,
    v: View<T>,
    opts: &LinearAttentionOptions,
    initial: Option<&[State<T>]>,
) -> Result<(Tensor<T>, Vec<State<T>>)> {
    forward("linear_attention_with", form, false, q, k, v, opts, initial)
}

/// Causal linear attention over packed variable-length sequences.
///
/// `q`, `k`, `v` are packed `[total_tokens, H, dim]` views (batch 1, see
/// [`Layout::packed`]; other token/head strides are fine); sequence `s` owns
/// tokens `cu_seqlens[s]..cu_seqlens[s+1]` (offsets start at 0, never decrease,
/// end at `total_tokens`; empty sequences pass their state through).
/// `initial` holds one state per (sequence, head), indexed `s * H + h`.
/// Returns the output as packed `[total_tokens, H, M]` and the final states.
pub fn varlen_causal_linear_attention<T: Real>(
    q: View<T>,
    k: View<T>,
    v: View<T>,
    cu_seqlens: &[usize],
    opts: &LinearAttentionOptions,
    initial: Option<&[State<T>]>,
) -> Result<(Tensor<T>, Vec<State<T>>)> {
    forward_varlen(
        "varlen_causal_linear_attention",
        true,
        q,
        k,
        v,
        cu_seqlens,
        opts,
        initial,
    )
}

/// Non-causal linear attention over packed variable-length sequences (each
/// sequence attends only to itself); conventions as
/// [`varlen_causal_linear_attention`].
pub fn varlen_linear_attention<T: Real>(
    q: View<T>,
    k: View<T>,
    v: View<T>,
    cu_seqlens: &[usize],
    opts: &LinearAttentionOptions,
    initial: Option<&[State<T>]>,
) -> Result<(Tensor<T>, Vec<State<T>>)> {
    forward_varlen(
        "varlen_linear_attention",
        false,
        q,
        k,
        v,
        cu_seqlens,
        opts,
        initial,
    )
}

/// One autoregressive step on a single head's state, in place:
/// `S += phi(k) v^T; z += phi(k)`, then `o = s phi(q)^T S / (s phi(q)^T z + eps)`.
///
/// The state absorbs the new token before the read-out, as in the causal form
/// (where j <= i includes i), so decoding after a prefill continues it exactly.
/// `q` and `k` have length D = `state.d`, `v` length M = `state.m`.
pub fn decode_step<T: Real>(
    state: &mut State<T>,
    q: &[T],
    k: &[T],
    v: &[T],
    opts: &LinearAttentionOptions,
) -> Result<Vec<T>> {
    const F: &str = "decode_step";
    let o = Opt::new(opts, F)?;
    state.check(F, "state", state.d, state.m)?;
    if state.d == 0 || state.m == 0 {
        return Err(ReferenceError::ZeroSized {
            func: F,
            arg: "state",
            dim: if state.d == 0 { "d" } else { "m" },
        });
    }
    for (arg, x, want) in [("q", q, state.d), ("k", k, state.d), ("v", v, state.m)] {
        if x.len() != want {
            return Err(ReferenceError::ShapeMismatch {
                func: F,
                arg,
                expected: format!("length {want}"),
                found: format!("length {}", x.len()),
            });
        }
    }
    let mut qh = vec![T::ZERO; state.d];
    let mut kh = vec![T::ZERO; state.d];
    o.fm.apply_into(k, T::ONE, &mut kh);
    update(state, &kh, v);
    o.fm.apply_into(q, o.scale, &mut qh);
    let mut out = vec![T::ZERO; state.m];
    readout(state, &qh, &o, &mut out);
    Ok(out)
}

/// Batched decode: advances each of the B*H `states` (indexed `b * H + h`)
/// in place over the views' tokens (usually 1), returning `[B, H, N, M]`.
/// Equivalent to [`causal_linear_attention`] with `initial = states`.
pub fn decode<T: Real>(
    states: &mut [State<T>],
    q: View<T>,
    k: View<T>,
    v: View<T>,
    opts: &LinearAttentionOptions,
) -> Result<Tensor<T>> {
    const F: &str = "decode";
    let o = Opt::new(opts, F)?;
    let (d, m) = check_qkv(F, &q, &k, &v)?;
    let l = *q.layout();
    check_states(states, F, "states", l.batch * l.heads, d, m)?;
    let mut out = Tensor::zeros(Layout::bhnd(l.batch, l.heads, l.tokens, m))?;
    for b in 0..l.batch {
        for h in 0..l.heads {
            let x = Seq {
                q,
                k,
                v,
                b,
                h,
                t0: 0,
                t1: l.tokens,
            };
            run_seq(
                Form::Recurrent,
                true,
                &x,
                &o,
                &mut states[b * l.heads + h],
                &mut out,
            );
        }
    }
    Ok(out)
}
