//! The CPU path: chunked linear attention, forward and backward, in f32 with
//! f32 states, O(N (D + M)) memory per head and never an N x N matrix.
//!
//! Each (sequence, head) is one unit of work, run in parallel with rayon.
//! Within a unit the sequence is cut into chunks of [`CHUNK`] tokens; inside a
//! chunk the causal part is a masked `CHUNK x CHUNK` product, across chunks the
//! running state `S` (D x M) and `z` (D) carry the history. The matrix
//! products go to `matrixmultiply::sgemm`.
//!
//! With `qh = s phi(q)`, `kh = phi(k)`, per chunk (rows i, j of the chunk):
//!
//! ```text
//! A    = qh kh^T (masked j <= i when causal)
//! num  = qh S + A v            den = qh . z + rowsum(A) + eps
//! S   += kh^T v                z  += colsum(kh)
//! ```
//!
//! The backward is the reference's two sweeps (see `linattn-reference`'s
//! `backward` module) in the same blocked form: a forward sweep gives
//! `d num`, `d den` and dq, a reverse sweep gives dk, dv and the gradient of
//! the initial state.

// Index loops over rows and columns of small blocks read best as written.
#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

use half::{bf16, f16};
use linattn_kernels::AttentionOptions;
use linattn_kernels::FeatureMap;
use rayon::prelude::*;

/// Tokens per chunk.
pub(crate) const CHUNK: usize = 64;

/// The element types the CPU path reads and writes (it computes in f32).
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// Where one tensor's rows are: element offsets of the (batch or sequence,
/// token, head) steps from `start`; the last dimension is contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Strides {
    pub start: usize,
    pub batch: usize,
    pub token: usize,
    pub head: usize,
}

/// The work: heads, sizes, and per sequence its first token and length
/// (dense: sequence = batch entry, first token 0; varlen: batch stride 0 and
/// first token `cu_seqlens[s]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub heads: usize,
    pub d: usize,
    pub m: usize,
    pub seqs: Vec<(usize, usize)>,
}

impl Geometry {
    /// Offset of row `t` (token within its sequence) of unit `u`.
    #[inline(always)]
    fn row(&self, st: &Strides, u: usize, t: usize) -> usize {
        let (s, h) = (u / self.heads, u % self.heads);
        st.start + s * st.batch + (self.seqs[s].0 + t) * st.token + h * st.head
    }
}

/// A strided output written by several threads, each to its own rows.
struct SharedOut<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: the units write disjoint rows (distinct (sequence, head, token)
// triples map to distinct rows for the contiguous layouts this is used with).
unsafe impl<T: Send> Send for SharedOut<T> {}
unsafe impl<T: Send> Sync for SharedOut<T> {}

impl<T: Elem> SharedOut<T> {
    fn new(out: &mut [T]) -> Self {
        SharedOut {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        }
    }

    /// Writes `row` at element offset `at`.
    #[inline(always)]
    fn write(&self, at: usize, row: &[f32]) {
        assert!(at + row.len() <= self.len, "row out of range");
        for (i, &x) in row.iter().enumerate() {
            // SAFETY: in bounds (checked above); rows are disjoint between units.
            unsafe { *self.ptr.add(at + i) = T::from_f32(x) };
        }
    }
}

#[inline(always)]
fn phi(fm: FeatureMap, x: f32) -> f32 {
    match fm {
        FeatureMap::EluPlusOne => {
            if x > 0.0 {
                x + 1.0
            } else {
                x.exp()
            }
        }
        FeatureMap::Relu => x.max(0.0),
        _ => x,
    }
}

#[inline(always)]
fn dphi(fm: FeatureMap, x: f32) -> f32 {
    match fm {
        FeatureMap::EluPlusOne => {
            if x > 0.0 {
                1.0
            } else {
                x.exp()
            }
        }
        FeatureMap::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        _ => 1.0,
    }
}

/// `C (m x n) = beta C + A (m x k) B (k x n)`, each with (row, column) strides.
#[allow(clippy::too_many_arguments)]
#[inline]
fn gemm(
    (m, k, n): (usize, usize, usize),
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    beta: f32,
    c: &mut [f32],
    rsc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for x in &mut c[i * rsc..i * rsc + n] {
                *x *= beta;
            }
        }
        return;
    }
    assert!((m - 1) * rsa + (k - 1) * csa < a.len(), "gemm: A too short");
    assert!((k - 1) * rsb + (n - 1) * csb < b.len(), "gemm: B too short");
    assert!((m - 1) * rsc + n <= c.len(), "gemm: C too short");
    // SAFETY: the extents were checked above; the strides fit in isize.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            rsc as isize,
            1,
        );
    }
}

/// One unit's inputs.
pub(crate) struct Unit<'a, T> {
    pub q: &'a [T],
    pub k: &'a [T],
    pub v: &'a [T],
    pub qs: Strides,
    pub ks: Strides,
    pub vs: Strides,
    pub geo: &'a Geometry,
}

/// Chunk scratch: the gathered rows of one chunk and the products.
struct Scratch {
    qh: Vec<f32>,
    kh: Vec<f32>,
    v: Vec<f32>,
    a: Vec<f32>,
    num: Vec<f32>,
    den: Vec<f32>,
    row: Vec<f32>,
}

impl Scratch {
    fn new(d: usize, m: usize) -> Self {
        Scratch {
            qh: vec![0.0; CHUNK * d],
            kh: vec![0.0; CHUNK * d],
            v: vec![0.0; CHUNK * m],
            a: vec![0.0; CHUNK * CHUNK],
            num: vec![0.0; CHUNK * m],
            den: vec![0.0; CHUNK],
            row: vec![0.0; d.max(m)],
        }
    }
}

impl<T: Elem> Unit<'_, T> {
    /// Gathers `phi(x) * scale` of rows `t0..t0 + c` into `dst` (c x dim).
    fn gather_phi(
        &self,
        x: &[T],
        st: &Strides,
        u: usize,
        t0: usize,
        c: usize,
        scale: f32,
        fm: FeatureMap,
        dst: &mut [f32],
    ) {
        let d = self.geo.d;
        for i in 0..c {
            let at = self.geo.row(st, u, t0 + i);
            for (o, &e) in dst[i * d..(i + 1) * d].iter_mut().zip(&x[at..at + d]) {
                *o = scale * phi(fm, e.to_f32());
            }
        }
    }

    /// Gathers rows `t0..t0 + c` of a dim-`dim` tensor as f32.
    fn gather(
        x: &[T],
        geo: &Geometry,
        st: &Strides,
        u: usize,
        t0: usize,
        c: usize,
        dim: usize,
        dst: &mut [f32],
    ) {
        for i in 0..c {
            let at = geo.row(st, u, t0 + i);
            for (o, &e) in dst[i * dim..(i + 1) * dim].iter_mut().zip(&x[at..at + dim]) {
                *o = e.to_f32();
            }
        }
    }

    fn len(&self, u: usize) -> usize {
        self.geo.seqs[u / self.geo.heads].1
    }

    /// Fills scratch `qh`, `kh`, `v` for the chunk at `t0` of `c` rows.
    fn load_chunk(&self, u: usize, t0: usize, c: usize, opts: &AttentionOptions, w: &mut Scratch) {
        let fm = opts.feature_map;
        self.gather_phi(self.q, &self.qs, u, t0, c, opts.scale, fm, &mut w.qh);
        self.gather_phi(self.k, &self.ks, u, t0, c, 1.0, fm, &mut w.kh);
        Self::gather(self.v, self.geo, &self.vs, u, t0, c, self.geo.m, &mut w.v);
    }

    /// `S += kh^T v`, `z += colsum(kh)` over the chunk in scratch.
    fn absorb(&self, c: usize, w: &Scratch, s: &mut [f32], z: &mut [f32]) {
        let (d, m) = (self.geo.d, self.geo.m);
        gemm((d, c, m), &w.kh, (1, d), &w.v, (m, 1), 1.0, s, m);
        for i in 0..c {
            for (zz, &k) in z.iter_mut().zip(&w.kh[i * d..(i + 1) * d]) {
                *zz += k;
            }
        }
    }

    /// `A = qh kh^T` (c x c, row stride CHUNK), lower-triangular when causal.
    fn scores(&self, c: usize, causal: bool, w: &mut Scratch) {
        let d = self.geo.d;
        gemm(
            (c, d, c),
            &w.qh,
            (d, 1),
            &w.kh,
            (1, d),
            0.0,
            &mut w.a,
            CHUNK,
        );
        if causal {
            for i in 0..c {
                w.a[i * CHUNK + i + 1..i * CHUNK + c].fill(0.0);
            }
        }
    }

    /// `num` and `den` of the chunk in scratch, from the state before it.
    fn readout(
        &self,
        c: usize,
        causal: bool,
        opts: &AttentionOptions,
        s: &[f32],
        z: &[f32],
        w: &mut Scratch,
    ) {
        let (d, m) = (self.geo.d, self.geo.m);
        gemm((c, d, m), &w.qh, (d, 1), s, (m, 1), 0.0, &mut w.num, m);
        if causal {
            self.scores(c, true, w);
            gemm(
                (c, c, m),
                &w.a,
                (CHUNK, 1),
                &w.v,
                (m, 1),
                1.0,
                &mut w.num,
                m,
            );
        }
        for i in 0..c {
            let qz: f32 = w.qh[i * d..(i + 1) * d]
                .iter()
                .zip(z)
                .map(|(a, b)| a * b)
                .sum();
            let intra: f32 = if causal {
                w.a[i * CHUNK..i * CHUNK + c].iter().sum()
            } else {
                0.0
            };
            w.den[i] = qz + intra + opts.eps;
        }
    }
}

/// Forward of every unit: `o` (written through `os`, contiguous layout) and
/// the final states (`s`: units x D x M, `z`: units x D, holding the initial
/// states on entry).
pub(crate) fn forward<T: Elem>(
    x: &Unit<'_, T>,
    causal: bool,
    opts: &AttentionOptions,
    o: &mut [T],
    os: Strides,
    s: &mut [f32],
    z: &mut [f32],
) {
    let (d, m) = (x.geo.d, x.geo.m);
    let out = SharedOut::new(o);
    s.par_chunks_mut(d * m)
        .zip(z.par_chunks_mut(d))
        .enumerate()
        .for_each(|(u, (s, z))| {
            let mut w = Scratch::new(d, m);
            let len = x.len(u);
            if !causal {
                for t0 in (0..len).step_by(CHUNK) {
                    let c = CHUNK.min(len - t0);
                    x.load_chunk(u, t0, c, opts, &mut w);
                    x.absorb(c, &w, s, z);
                }
            }
            for t0 in (0..len).step_by(CHUNK) {
                let c = CHUNK.min(len - t0);
                x.load_chunk(u, t0, c, opts, &mut w);
                x.readout(c, causal, opts, s, z, &mut w);
                for i in 0..c {
                    let row = &mut w.row[..m];
                    let inv = if opts.normalize { 1.0 / w.den[i] } else { 1.0 };
                    for (r, &n) in row.iter_mut().zip(&w.num[i * m..(i + 1) * m]) {
                        *r = n * inv;
                    }
                    out.write(x.geo.row(&os, u, t0 + i), row);
                }
                if causal {
                    x.absorb(c, &w, s, z);
                }
            }
        });
}

/// The gradients' destinations (contiguous layouts, written through strides).
pub(crate) struct GradOut<'a, T> {
    pub dq: &'a mut [T],
    pub dk: &'a mut [T],
    pub dv: &'a mut [T],
    pub dqs: Strides,
    pub dks: Strides,
    pub dvs: Strides,
}

/// Backward of every unit. `g` holds dL/do (strides `gs`); `init` the
/// initial states (units x D x M, units x D; zeros when there were none) and
/// on return their gradients dS0, dz0.
pub(crate) fn backward<T: Elem>(
    x: &Unit<'_, T>,
    g: &[T],
    gs: Strides,
    causal: bool,
    opts: &AttentionOptions,
    out: GradOut<'_, T>,
    s0: &mut [f32],
    z0: &mut [f32],
) {
    let (d, m) = (x.geo.d, x.geo.m);
    let fm = opts.feature_map;
    let (dq, dk, dv) = (
        SharedOut::new(out.dq),
        SharedOut::new(out.dk),
        SharedOut::new(out.dv),
    );
    let (dqs, dks, dvs) = (out.dqs, out.dks, out.dvs);
    s0.par_chunks_mut(d * m)
        .zip(z0.par_chunks_mut(d))
        .enumerate()
        .for_each(|(u, (s0, z0))| {
            let mut w = Scratch::new(d, m);
            let len = x.len(u);
            let mut s = s0.to_vec();
            let mut z = z0.to_vec();
            if !causal {
                for t0 in (0..len).step_by(CHUNK) {
                    let c = CHUNK.min(len - t0);
                    x.load_chunk(u, t0, c, opts, &mut w);
                    x.absorb(c, &w, &mut s, &mut z);
                }
            }
            // d num (len x M) and d den (len) of the whole unit, for the reverse sweep.
            let mut dnum = vec![0f32; len * m];
            let mut dden = vec![0f32; len];
            let mut gch = vec![0f32; CHUNK * m];
            let mut b = vec![0f32; CHUNK * CHUNK];
            let mut dxh = vec![0f32; CHUNK * d];
            let mut ds = vec![0f32; d * m];
            let mut dz = vec![0f32; d];
            // Forward sweep: d num, d den, dq.
            for t0 in (0..len).step_by(CHUNK) {
                let c = CHUNK.min(len - t0);
                x.load_chunk(u, t0, c, opts, &mut w);
                x.readout(c, causal, opts, &s, &z, &mut w);
                Unit::<T>::gather(g, x.geo, &gs, u, t0, c, m, &mut gch);
                let dn = &mut dnum[t0 * m..(t0 + c) * m];
                for i in 0..c {
                    let gi = &gch[i * m..(i + 1) * m];
                    let dni = &mut dn[i * m..(i + 1) * m];
                    if opts.normalize {
                        let den = w.den[i];
                        let go: f32 = gi
                            .iter()
                            .zip(&w.num[i * m..(i + 1) * m])
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                            / den;
                        dden[t0 + i] = -go / den;
                        for (o, &gg) in dni.iter_mut().zip(gi) {
                            *o = gg / den;
                        }
                    } else {
                        dni.copy_from_slice(gi);
                    }
                }
                let dd = &dden[t0..t0 + c];
                // d qh = d num S^T + d den z^T (+ the masked intra-chunk part).
                gemm((c, m, d), dn, (m, 1), &s, (1, m), 0.0, &mut dxh, d);
                for i in 0..c {
                    for (o, &zz) in dxh[i * d..(i + 1) * d].iter_mut().zip(z.iter()) {
                        *o += dd[i] * zz;
                    }
                }
                if causal {
                    // B_ij = d num_i . v_j + d den_i, for j <= i.
                    gemm((c, m, c), dn, (m, 1), &w.v, (1, m), 0.0, &mut b, CHUNK);
                    for i in 0..c {
                        for j in 0..c {
                            b[i * CHUNK + j] = if j <= i {
                                b[i * CHUNK + j] + dd[i]
                            } else {
                                0.0
                            };
                        }
                    }
                    gemm((c, c, d), &b, (CHUNK, 1), &w.kh, (d, 1), 1.0, &mut dxh, d);
                } else {
                    // dS, dz of the total state: sum_i qh_i d num_i^T, sum_i d den_i qh_i.
                    gemm((d, c, m), &w.qh, (1, d), dn, (m, 1), 1.0, &mut ds, m);
                    for i in 0..c {
                        for (o, &q) in dz.iter_mut().zip(&w.qh[i * d..(i + 1) * d]) {
                            *o += dd[i] * q;
                        }
                    }
                }
                for i in 0..c {
                    let at = x.geo.row(&x.qs, u, t0 + i);
                    let row = &mut w.row[..d];
                    for (j, r) in row.iter_mut().enumerate() {
                        *r = opts.scale * dphi(fm, x.q[at + j].to_f32()) * dxh[i * d + j];
                    }
                    dq.write(x.geo.row(&dqs, u, t0 + i), row);
                }
                if causal {
                    x.absorb(c, &w, &mut s, &mut z);
                }
            }
            // Reverse sweep: dk, dv, and the suffix sums dS, dz.
            let starts: Vec<usize> = (0..len).step_by(CHUNK).collect();
            for &t0 in starts.iter().rev() {
                let c = CHUNK.min(len - t0);
                x.load_chunk(u, t0, c, opts, &mut w);
                let dn = &dnum[t0 * m..(t0 + c) * m];
                let dd = &dden[t0..t0 + c];
                // d kh = v dS^T + dz (+ B^T qh);  d v = kh dS (+ A^T d num).
                gemm((c, m, d), &w.v, (m, 1), &ds, (1, m), 0.0, &mut dxh, d);
                for i in 0..c {
                    for (o, &zz) in dxh[i * d..(i + 1) * d].iter_mut().zip(dz.iter()) {
                        *o += zz;
                    }
                }
                gemm((c, d, m), &w.kh, (d, 1), &ds, (m, 1), 0.0, &mut w.num, m);
                if causal {
                    gemm((c, m, c), dn, (m, 1), &w.v, (1, m), 0.0, &mut b, CHUNK);
                    for i in 0..c {
                        for j in 0..c {
                            b[i * CHUNK + j] = if j <= i {
                                b[i * CHUNK + j] + dd[i]
                            } else {
                                0.0
                            };
                        }
                    }
                    gemm((c, c, d), &b, (1, CHUNK), &w.qh, (d, 1), 1.0, &mut dxh, d);
                    x.scores(c, true, &mut w);
                    gemm((c, c, m), &w.a, (1, CHUNK), dn, (m, 1), 1.0, &mut w.num, m);
                }
                for i in 0..c {
                    let at = x.geo.row(&x.ks, u, t0 + i);
                    let row = &mut w.row[..d];
                    for (j, r) in row.iter_mut().enumerate() {
                        *r = dphi(fm, x.k[at + j].to_f32()) * dxh[i * d + j];
                    }
                    dk.write(x.geo.row(&dks, u, t0 + i), row);
                    dv.write(x.geo.row(&dvs, u, t0 + i), &w.num[i * m..(i + 1) * m]);
                }
                if causal {
                    gemm((d, c, m), &w.qh, (1, d), dn, (m, 1), 1.0, &mut ds, m);
                    for i in 0..c {
                        for (o, &q) in dz.iter_mut().zip(&w.qh[i * d..(i + 1) * d]) {
                            *o += dd[i] * q;
                        }
                    }
                }
            }
            s0.copy_from_slice(&ds);
            z0.copy_from_slice(&dz);
        });
}

/// One decode step of every (batch, head): `q`, `k` are `[units, D]`, `v`
/// `[units, M]` (contiguous); the states are advanced in place and `o`
/// (`[units, M]`) written.
pub(crate) fn decode<T: Elem>(
    q: &[T],
    k: &[T],
    v: &[T],
    d: usize,
    m: usize,
    opts: &AttentionOptions,
    s: &mut [f32],
    z: &mut [f32],
    o: &mut [T],
) {
    let fm = opts.feature_map;
    s.par_chunks_mut(d * m)
        .zip(z.par_chunks_mut(d))
        .zip(o.par_chunks_mut(m))
        .enumerate()
        .for_each(|(u, ((s, z), o))| {
            let kh: Vec<f32> = k[u * d..(u + 1) * d]
                .iter()
                .map(|&x| phi(fm, x.to_f32()))
                .collect();
            let qh: Vec<f32> = q[u * d..(u + 1) * d]
                .iter()
                .map(|&x| opts.scale * phi(fm, x.to_f32()))
                .collect();
            let vv = &v[u * m..(u + 1) * m];
            for i in 0..d {
                z[i] += kh[i];
                for (se, &ve) in s[i * m..(i + 1) * m].iter_mut().zip(vv) {
                    *se += kh[i] * ve.to_f32();
                }
            }
            let den = qh.iter().zip(z.iter()).map(|(a, b)| a * b).sum::<f32>() + opts.eps;
            let inv = if opts.normalize { 1.0 / den } else { 1.0 };
            for (e, oe) in o.iter_mut().enumerate() {
                let num: f32 = (0..d).map(|i| qh[i] * s[i * m + e]).sum();
                *oe = T::from_f32(num * inv);
            }
        });
}
