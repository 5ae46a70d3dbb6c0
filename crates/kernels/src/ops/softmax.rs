//! `softmax_attention.cu`: the softmax-attention baseline. A causal (or
//! full) prefill over `[batch, tokens, heads, d|m]` views, and a KV-cache
//! decode step that appends one token's k, v into preallocated caches and
//! attends its q over every cached position. fp32 online softmax; f32, f16
//! or bf16 inputs; head sizes up to [`MAX_HEAD_DIM`].

use crate::dtype::{DType, Element};
use crate::params::LinattnSoftmaxParams;
use crate::plan::{Executor, LaunchPlan};
use crate::{Buffer, Device, Error, Result};

const MODULE: &str = "softmax_attention";
/// Warps (query rows, or decode heads) per block, as in the `.cu` file.
pub const WARPS: u32 = 4;
/// Largest query/key and value size: 8 elements per lane of a warp.
pub const MAX_HEAD_DIM: usize = 256;

/// Element strides of one `[batch, tokens, heads, dim]` operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strides {
    /// Between batches.
    pub batch: usize,
    /// Between tokens.
    pub token: usize,
    /// Between heads.
    pub head: usize,
}

impl Strides {
    /// Contiguous token-major `[batch, tokens, heads, dim]`.
    pub fn bnhd(tokens: usize, heads: usize, dim: usize) -> Self {
        Strides {
            batch: tokens * heads * dim,
            token: heads * dim,
            head: dim,
        }
    }

    /// Elements a buffer needs for this view (0 if any extent is 0).
    fn span(&self, b: usize, n: usize, h: usize, dim: usize) -> Option<usize> {
        if b == 0 || n == 0 || h == 0 || dim == 0 {
            return Some(0);
        }
        let last = (b - 1)
            .checked_mul(self.batch)?
            .checked_add((n - 1).checked_mul(self.token)?)?
            .checked_add((h - 1).checked_mul(self.head)?)?;
        last.checked_add(dim)
    }
}

/// Shape of a softmax-attention prefill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoftmaxShape {
    /// Sequences.
    pub batch: usize,
    /// Heads per sequence.
    pub heads: usize,
    /// Tokens per sequence.
    pub tokens: usize,
    /// Query/key size.
    pub d: usize,
    /// Value size.
    pub m: usize,
    /// Strides of q, k, v, o.
    pub q: Strides,
    /// Key strides.
    pub k: Strides,
    /// Value strides.
    pub v: Strides,
    /// Output strides.
    pub o: Strides,
}

impl SoftmaxShape {
    /// Contiguous token-major `[batch, tokens, heads, d|m]` for every operand.
    pub fn bnhd(batch: usize, heads: usize, tokens: usize, d: usize, m: usize) -> Self {
        SoftmaxShape {
            batch,
            heads,
            tokens,
            d,
            m,
            q: Strides::bnhd(tokens, heads, d),
            k: Strides::bnhd(tokens, heads, d),
            v: Strides::bnhd(tokens, heads, m),
            o: Strides::bnhd(tokens, heads, m),
        }
    }
}

fn check_dims(kernel: &'static str, d: usize, m: usize) -> Result<()> {
    for (arg, x) in [("d", d), ("m", m)] {
        if x == 0 || x > MAX_HEAD_DIM {
            return Err(Error::invalid(
                kernel,
                arg,
                format!("{x} is not in 1..={MAX_HEAD_DIM}"),
            ));
        }
    }
    Ok(())
}

fn check_len(
    kernel: &'static str,
    arg: &'static str,
    len: usize,
    need: Option<usize>,
) -> Result<()> {
    let need = need.filter(|&n| n <= i64::MAX as usize).ok_or_else(|| {
        Error::invalid(kernel, arg, "the view's extent overflows 64-bit indexing")
    })?;
    if len < need {
        return Err(Error::invalid(
            kernel,
            arg,
            format!("buffer holds {len} elements, the view needs {need}"),
        ));
    }
    Ok(())
}

fn scale_or_default(kernel: &'static str, scale: Option<f32>, d: usize) -> Result<f32> {
    let s = scale.unwrap_or(1.0 / (d as f32).sqrt());
    if !s.is_finite() {
        return Err(Error::invalid(
            kernel,
            "scale",
            format!("{s} is not finite"),
        ));
    }
    Ok(s)
}

fn kernel_name(prefix: &str, dtype: DType) -> &'static str {
    match (prefix, dtype) {
        ("prefill", DType::F32) => "softmax_prefill_f32",
        ("prefill", DType::F16) => "softmax_prefill_f16",
        ("prefill", DType::Bf16) => "softmax_prefill_bf16",
        (_, DType::F32) => "softmax_decode_f32",
        (_, DType::F16) => "softmax_decode_f16",
        (_, DType::Bf16) => "softmax_decode_bf16",
    }
}

fn blank(batch: usize, heads: usize, d: usize, m: usize, scale: f32) -> LinattnSoftmaxParams {
    LinattnSoftmaxParams {
        batch: batch as i64,
        heads: heads as i64,
        d: d as i64,
        m: m as i64,
        scale,
        ..LinattnSoftmaxParams::default()
    }
}

/// Prefill launch: `batch * heads * ceil(tokens / WARPS)` blocks of
/// `32 * WARPS` threads, one warp per query row. Pointers q, k, v, o.
#[allow(clippy::too_many_arguments)]
pub fn plan_prefill(
    dtype: DType,
    s: &SoftmaxShape,
    causal: bool,
    scale: f32,
    q: u64,
    k: u64,
    v: u64,
    o: u64,
) -> LaunchPlan<LinattnSoftmaxParams> {
    let row_blocks = s.tokens.div_ceil(WARPS as usize);
    let mut p = blank(s.batch, s.heads, s.d, s.m, scale);
    p.q = q;
    p.k = k;
    p.v = v;
    p.o = o;
    p.tokens = s.tokens as i64;
    p.causal = causal as i32;
    for (st, (b, t, h)) in [
        (
            s.q,
            (
                &mut p.q_batch_stride,
                &mut p.q_token_stride,
                &mut p.q_head_stride,
            ),
        ),
        (
            s.k,
            (
                &mut p.k_batch_stride,
                &mut p.k_token_stride,
                &mut p.k_head_stride,
            ),
        ),
        (
            s.v,
            (
                &mut p.v_batch_stride,
                &mut p.v_token_stride,
                &mut p.v_head_stride,
            ),
        ),
        (
            s.o,
            (
                &mut p.o_batch_stride,
                &mut p.o_token_stride,
                &mut p.o_head_stride,
            ),
        ),
    ] {
        *b = st.batch as i64;
        *t = st.token as i64;
        *h = st.head as i64;
    }
    LaunchPlan {
        module: MODULE,
        kernel: kernel_name("prefill", dtype),
        grid: [(s.batch * s.heads * row_blocks) as u32, 1, 1],
        block: [32 * WARPS, 1, 1],
        shared_bytes: 0,
        params: p,
    }
}

/// Validates a prefill shape against buffer lengths; returns whether there is work.
pub fn validate_prefill(s: &SoftmaxShape, lens: [usize; 4]) -> Result<bool> {
    const K: &str = "softmax_prefill";
    check_dims(K, s.d, s.m)?;
    let (b, n, h) = (s.batch, s.tokens, s.heads);
    check_len(K, "q", lens[0], s.q.span(b, n, h, s.d))?;
    check_len(K, "k", lens[1], s.k.span(b, n, h, s.d))?;
    check_len(K, "v", lens[2], s.v.span(b, n, h, s.m))?;
    check_len(K, "o", lens[3], s.o.span(b, n, h, s.m))?;
    let blocks = b
        .checked_mul(h)
        .and_then(|x| x.checked_mul(n.div_ceil(WARPS as usize)));
    if blocks.is_none_or(|x| x > i32::MAX as usize) {
        return Err(Error::invalid(
            K,
            "tokens",
            "batch * heads * tokens / 4 exceeds the grid limit",
        ));
    }
    Ok(b > 0 && h > 0 && n > 0)
}

/// Causal (or, with `causal = false`, full) softmax attention
/// `o = softmax(scale q k^T) v` on a [`Device`]; `scale` defaults to `1/sqrt(d)`.
#[allow(clippy::too_many_arguments)]
pub fn softmax_prefill<T: Element>(
    dev: &Device,
    q: &Buffer<T>,
    k: &Buffer<T>,
    v: &Buffer<T>,
    o: &mut Buffer<T>,
    shape: &SoftmaxShape,
    causal: bool,
    scale: Option<f32>,
) -> Result<()> {
    const K: &str = "softmax_prefill";
    let scale = scale_or_default(K, scale, shape.d)?;
    if !validate_prefill(shape, [q.len(), k.len(), v.len(), o.len()])? {
        return Ok(());
    }
    let (qp, _gq) = q.read_ptr(dev, K, "q")?;
    let (kp, _gk) = k.read_ptr(dev, K, "k")?;
    let (vp, _gv) = v.read_ptr(dev, K, "v")?;
    let o_bytes = o.len() * std::mem::size_of::<T>();
    let (op, _go) = o.write_ptr(dev, K, "o")?;
    let plan = plan_prefill(T::DTYPE, shape, causal, scale, qp, kp, vp, op);
    // SAFETY: pointers of `dev`; every view validated against its buffer.
    unsafe { dev.launch_writing(&plan, &[(op, o_bytes)]) }
}

/// A KV cache layout for [`softmax_decode_step`]: `batch` sequences of
/// `heads` heads, room for `capacity` tokens of size `d` (keys and values
/// alike), token-major `[batch, capacity, heads, d]`, so a prefill's
/// contiguous k and v `[batch, n, heads, d]` (batch 1) are the cache's first
/// `n` tokens as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    /// Sequences.
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// Key and value size.
    pub d: usize,
    /// Tokens the cache can hold.
    pub capacity: usize,
}

impl CacheShape {
    /// Elements of each cache buffer.
    pub fn elements(&self) -> Option<usize> {
        self.batch
            .checked_mul(self.capacity)?
            .checked_mul(self.heads)?
            .checked_mul(self.d)
    }
}

/// Decode launch: `ceil(batch * heads / WARPS)` blocks, one warp per head.
/// q, k, v, o are contiguous `[batch, heads, d]`.
#[allow(clippy::too_many_arguments)]
pub fn plan_decode(
    dtype: DType,
    c: &CacheShape,
    position: usize,
    scale: f32,
    ptrs: [u64; 6],
) -> LaunchPlan<LinattnSoftmaxParams> {
    let [q, k, v, o, kc, vc] = ptrs;
    let mut p = blank(c.batch, c.heads, c.d, c.d, scale);
    (p.q, p.k, p.v, p.o, p.k_cache, p.v_cache) = (q, k, v, o, kc, vc);
    p.tokens = 1;
    p.position = position as i64;
    p.causal = 1;
    let (hd, bd) = (c.d as i64, (c.heads * c.d) as i64);
    (p.q_batch_stride, p.q_token_stride, p.q_head_stride) = (bd, bd, hd);
    (p.k_batch_stride, p.k_token_stride, p.k_head_stride) = (bd, bd, hd);
    (p.v_batch_stride, p.v_token_stride, p.v_head_stride) = (bd, bd, hd);
    (p.o_batch_stride, p.o_token_stride, p.o_head_stride) = (bd, bd, hd);
    p.cache_batch_stride = (c.capacity * c.heads * c.d) as i64;
    p.cache_token_stride = bd;
    p.cache_head_stride = hd;
    LaunchPlan {
        module: MODULE,
        kernel: kernel_name("decode", dtype),
        grid: [(c.batch * c.heads).div_ceil(WARPS as usize) as u32, 1, 1],
        block: [32 * WARPS, 1, 1],
        shared_bytes: 0,
        params: p,
    }
}

/// One decode step: writes `k`, `v` (`[batch, heads, d]`) at `position` of
/// the caches, then `o = softmax(scale q K^T) V` over positions
/// `0..=position`; `scale` defaults to `1/sqrt(d)`. Positions before
/// `position` must hold earlier tokens (a prefill's k, v, or earlier steps).
#[allow(clippy::too_many_arguments)]
pub fn softmax_decode_step<T: Element>(
    dev: &Device,
    q: &Buffer<T>,
    k: &Buffer<T>,
    v: &Buffer<T>,
    o: &mut Buffer<T>,
    k_cache: &mut Buffer<T>,
    v_cache: &mut Buffer<T>,
    cache: &CacheShape,
    position: usize,
    scale: Option<f32>,
) -> Result<()> {
    const K: &str = "softmax_decode";
    check_dims(K, cache.d, cache.d)?;
    let scale = scale_or_default(K, scale, cache.d)?;
    if position >= cache.capacity {
        return Err(Error::invalid(
            K,
            "position",
            format!(
                "{position} is not below the cache capacity {}",
                cache.capacity
            ),
        ));
    }
    let step = cache
        .batch
        .checked_mul(cache.heads)
        .and_then(|x| x.checked_mul(cache.d));
    for (arg, len) in [
        ("q", q.len()),
        ("k", k.len()),
        ("v", v.len()),
        ("o", o.len()),
    ] {
        check_len(K, arg, len, step)?;
    }
    check_len(K, "k_cache", k_cache.len(), cache.elements())?;
    check_len(K, "v_cache", v_cache.len(), cache.elements())?;
    if cache.batch * cache.heads > i32::MAX as usize {
        return Err(Error::invalid(
            K,
            "heads",
            "batch * heads exceeds the grid limit",
        ));
    }
    if cache.batch == 0 || cache.heads == 0 {
        return Ok(());
    }
    let (qp, _gq) = q.read_ptr(dev, K, "q")?;
    let (kp, _gk) = k.read_ptr(dev, K, "k")?;
    let (vp, _gv) = v.read_ptr(dev, K, "v")?;
    let sz = std::mem::size_of::<T>();
    let writes = [o.len() * sz, k_cache.len() * sz, v_cache.len() * sz];
    let (op, _go) = o.write_ptr(dev, K, "o")?;
    let (kcp, _gkc) = k_cache.write_ptr(dev, K, "k_cache")?;
    let (vcp, _gvc) = v_cache.write_ptr(dev, K, "v_cache")?;
    let plan = plan_decode(T::DTYPE, cache, position, scale, [qp, kp, vp, op, kcp, vcp]);
    // SAFETY: pointers of `dev`; lengths and position validated.
    unsafe {
        dev.launch_writing(
            &plan,
            &[(op, writes[0]), (kcp, writes[1]), (vcp, writes[2])],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_plan_has_a_warp_per_row() {
        for (b, h, n) in [(1, 1, 1), (2, 3, 4), (1, 4, 5), (3, 2, 1000)] {
            let s = SoftmaxShape::bnhd(b, h, n, 64, 32);
            assert!(validate_prefill(&s, [usize::MAX; 4]).unwrap());
            let p = plan_prefill(DType::F32, &s, true, 0.125, 1, 2, 3, 4);
            let warps = p.blocks() * p.threads_per_block() / 32;
            assert_eq!(p.grid[0] as usize, b * h * n.div_ceil(4));
            assert!(warps as usize >= b * h * n && (warps as usize) < b * h * (n + 4));
            assert_eq!(
                (p.params.q_token_stride, p.params.v_token_stride),
                ((h * 64) as i64, (h * 32) as i64)
            );
            assert_eq!(p.params.causal, 1);
        }
    }

    #[test]
    fn prefill_rejects_bad_shapes() {
        let s = SoftmaxShape::bnhd(1, 2, 8, 257, 16);
        assert!(validate_prefill(&s, [usize::MAX; 4])
            .unwrap_err()
            .to_string()
            .contains("`d`"));
        let s = SoftmaxShape::bnhd(1, 2, 8, 16, 16);
        let e = validate_prefill(&s, [256, 256, 255, 256])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`v`") && e.contains("needs 256"), "{e}");
        assert!(!validate_prefill(&SoftmaxShape::bnhd(1, 2, 0, 16, 16), [0; 4]).unwrap());
    }

    #[test]
    fn decode_plan_strides() {
        let c = CacheShape {
            batch: 2,
            heads: 3,
            d: 8,
            capacity: 10,
        };
        let p = plan_decode(DType::Bf16, &c, 4, 0.5, [1, 2, 3, 4, 5, 6]);
        assert_eq!(p.grid[0], 2);
        assert_eq!(p.kernel, "softmax_decode_bf16");
        assert_eq!(
            (
                p.params.cache_batch_stride,
                p.params.cache_token_stride,
                p.params.cache_head_stride
            ),
            (240, 24, 8)
        );
        assert_eq!(
            (p.params.k_cache, p.params.v_cache, p.params.position),
            (5, 6, 4)
        );
        assert_eq!(c.elements(), Some(480));
    }
}
