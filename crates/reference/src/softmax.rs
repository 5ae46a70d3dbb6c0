//! Softmax attention, the O(N^2) baseline linear attention is measured
//! against, and a KV cache for its decode step.

use crate::error::{ReferenceError, Result};
use crate::kernels::{axpy, dot};
use crate::layout::{shape_str, Layout, Tensor, View};
use crate::real::Real;

fn check_scale(func: &'static str, scale: Option<f64>, d: usize) -> Result<f64> {
    match scale {
        Some(s) if !s.is_finite() => Err(ReferenceError::InvalidValue {
            func,
            arg: "scale",
            detail: format!("scale = {s}; expected a finite number"),
        }),
        Some(s) => Ok(s),
        None => Ok(1.0 / (d as f64).sqrt()),
    }
}

fn check_qk<T>(func: &'static str, q: &View<T>, k: &View<T>) -> Result<()> {
    let (lq, lk) = (q.layout(), k.layout());
    if !lk.same_rows(lq) || lk.dim != lq.dim {
        return Err(ReferenceError::ShapeMismatch {
            func,
            arg: "k",
            expected: format!("{} (the shape of q)", shape_str(lq)),
            found: shape_str(lk),
        });
    }
    Ok(())
}

/// Softmax weights of `q` over `n` keys into `p[..n]` (max-subtracted, summing to 1).
#[inline(always)]
fn weights<'a, T: Real>(q: &[T], n: usize, key: impl Fn(usize) -> &'a [T], scale: T, p: &mut [T]) {
    let mut mx = T::ZERO;
    for (j, pj) in p[..n].iter_mut().enumerate() {
        *pj = dot(q, key(j)) * scale;
        if j == 0 || *pj > mx {
            mx = *pj;
        }
    }
    let mut total = T::ZERO;
    for pj in p[..n].iter_mut() {
        *pj = (*pj - mx).exp();
        total += *pj;
    }
    for pj in p[..n].iter_mut() {
        *pj = *pj / total;
    }
}

/// Softmax attention: `o_i = sum_j softmax_j(scale * q_i . k_j) v_j`, over
/// `j <= i` when `causal`. `scale` defaults to `1/sqrt(D)`.
///
/// `q`, `k` are (B, H, N, D), `v` (B, H, N, M), any strides; returns
/// contiguous `[B, H, N, M]`.
pub fn softmax_attention<T: Real>(
    q: View<T>,
    k: View<T>,
    v: View<T>,
    causal: bool,
    scale: Option<f64>,
) -> Result<Tensor<T>> {
    const F: &str = "softmax_attention";
    let (_, m) = crate::linear::check_qkv(F, &q, &k, &v)?;
    let l = *q.layout();
    let scale = T::from_f64(check_scale(F, scale, l.dim)?);
    let mut out = Tensor::zeros(Layout::bhnd(l.batch, l.heads, l.tokens, m))?;
    let mut p = vec![T::ZERO; l.tokens];
    for b in 0..l.batch {
        for h in 0..l.heads {
            for i in 0..l.tokens {
                let n = if causal { i + 1 } else { l.tokens };
                weights(q.r(b, h, i), n, |j| k.r(b, h, j), scale, &mut p);
                let row = out.row_mut(b, h, i);
                for (j, &pj) in p[..n].iter().enumerate() {
                    axpy(row, pj, v.r(b, h, j));
                }
            }
        }
    }
    Ok(out)
}

/// The attention probabilities of [`softmax_attention`] as a contiguous
/// `[B, H, N, N]` tensor (row `(b, h, i)` holds the weights of query i; masked
/// entries are 0). For tests of the softmax itself: rows sum to one.
pub fn softmax_probabilities<T: Real>(
    q: View<T>,
    k: View<T>,
    causal: bool,
    scale: Option<f64>,
) -> Result<Tensor<T>> {
    const F: &str = "softmax_probabilities";
    check_qk(F, &q, &k)?;
    let l = *q.layout();
    let scale = T::from_f64(check_scale(F, scale, l.dim)?);
    if l.tokens == 0 {
        return Tensor::zeros(Layout::bhnd(l.batch, l.heads, 0, 1));
    }
    let mut out = Tensor::zeros(Layout::bhnd(l.batch, l.heads, l.tokens, l.tokens))?;
    for b in 0..l.batch {
        for h in 0..l.heads {
            for i in 0..l.tokens {
                let n = if causal { i + 1 } else { l.tokens };
                weights(
                    q.r(b, h, i),
                    n,
                    |j| k.r(b, h, j),
                    scale,
                    out.row_mut(b, h, i),
                );
            }
        }
    }
    Ok(out)
}

/// Key/value cache for autoregressive softmax attention over B*H heads: the
/// decode baseline that the linear-attention state replaces.
#[derive(Debug, Clone, PartialEq)]
pub struct KvCache<T> {
    batch: usize,
    heads: usize,
    d: usize,
    m: usize,
    len: usize,
    keys: Vec<Vec<T>>,
    values: Vec<Vec<T>>,
}

impl<T: Real> KvCache<T> {
    /// An empty cache for `batch` x `heads` heads with key size `d` and value
    /// size `m` (all at least 1).
    pub fn new(batch: usize, heads: usize, d: usize, m: usize) -> Result<Self> {
        for (n, dim) in [(batch, "batch"), (heads, "heads"), (d, "d"), (m, "m")] {
            if n == 0 {
                return Err(ReferenceError::ZeroSized {
                    func: "KvCache::new",
                    arg: dim,
                    dim,
                });
            }
        }
        Ok(KvCache {
            batch,
            heads,
            d,
            m,
            len: 0,
            keys: vec![Vec::new(); batch * heads],
            values: vec![Vec::new(); batch * heads],
        })
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first append.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, func: &'static str, arg: &'static str, x: &View<T>, dim: usize) -> Result<()> {
        let l = x.layout();
        if l.batch != self.batch || l.heads != self.heads || l.dim != dim {
            return Err(ReferenceError::ShapeMismatch {
                func,
                arg,
                expected: format!(
                    "batch {}, heads {}, dim {dim} (the cache's)",
                    self.batch, self.heads
                ),
                found: shape_str(l),
            });
        }
        Ok(())
    }

    /// Appends every token of `k` (B, H, n, D) and `v` (B, H, n, M).
    pub fn append(&mut self, k: View<T>, v: View<T>) -> Result<()> {
        const F: &str = "KvCache::append";
        self.check(F, "k", &k, self.d)?;
        self.check(F, "v", &v, self.m)?;
        if k.layout().tokens != v.layout().tokens {
            return Err(ReferenceError::ShapeMismatch {
                func: F,
                arg: "v",
                expected: format!("{} tokens (those of k)", k.layout().tokens),
                found: format!("{} tokens", v.layout().tokens),
            });
        }
        for b in 0..self.batch {
            for h in 0..self.heads {
                let i = b * self.heads + h;
                for t in 0..k.layout().tokens {
                    self.keys[i].extend_from_slice(k.r(b, h, t));
                    self.values[i].extend_from_slice(v.r(b, h, t));
                }
            }
        }
        self.len += k.layout().tokens;
        Ok(())
    }

    /// Each query token of `q` (B, H, n, D) attends over every cached token;
    /// returns `[B, H, n, M]`. `scale` defaults to `1/sqrt(D)`.
    pub fn attend(&self, q: View<T>, scale: Option<f64>) -> Result<Tensor<T>> {
        const F: &str = "KvCache::attend";
        self.check(F, "q", &q, self.d)?;
        if self.len == 0 {
            return Err(ReferenceError::ZeroSized {
                func: F,
                arg: "self",
                dim: "cached tokens",
            });
        }
        let scale = T::from_f64(check_scale(F, scale, self.d)?);
        let l = *q.layout();
        let mut out = Tensor::zeros(Layout::bhnd(l.batch, l.heads, l.tokens, self.m))?;
        let mut p = vec![T::ZERO; self.len];
        let (d, m) = (self.d, self.m);
        for b in 0..l.batch {
            for h in 0..l.heads {
                let i = b * self.heads + h;
                let (ks, vs) = (&self.keys[i], &self.values[i]);
                for t in 0..l.tokens {
                    weights(
                        q.r(b, h, t),
                        self.len,
                        |j| &ks[j * d..(j + 1) * d],
                        scale,
                        &mut p,
                    );
                    let row = out.row_mut(b, h, t);
                    for (j, &pj) in p.iter().enumerate() {
                        axpy(row, pj, &vs[j * m..(j + 1) * m]);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Decode: for each token in order, append its k, v then attend its q over
    /// the whole cache. Matches causal [`softmax_attention`] over the history.
    pub fn step(
        &mut self,
        q: View<T>,
        k: View<T>,
        v: View<T>,
        scale: Option<f64>,
    ) -> Result<Tensor<T>> {
        const F: &str = "KvCache::step";
        let (_, m) = crate::linear::check_qkv(F, &q, &k, &v)?;
        self.check(F, "q", &q, self.d)?;
        self.check(F, "v", &v, self.m)?;
        let l = *q.layout();
        let mut out = Tensor::zeros(Layout::bhnd(l.batch, l.heads, l.tokens, m))?;
        for t in 0..l.tokens {
            let (qt, kt, vt) = match (
                q.slice_tokens(t, t + 1),
                k.slice_tokens(t, t + 1),
                v.slice_tokens(t, t + 1),
            ) {
                (Some(a), Some(b), Some(c)) => (a, b, c),
                _ => unreachable!("t < tokens"),
            };
            self.append(kt, vt)?;
            let o = self.attend(qt, scale)?;
            for b in 0..l.batch {
                for h in 0..l.heads {
                    out.row_mut(b, h, t).copy_from_slice(o.view().r(b, h, 0));
                }
            }
        }
        Ok(out)
    }
}
