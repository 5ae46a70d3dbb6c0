//! Strided tensor descriptions: [`Layout`], borrowed [`View`]s over flat
//! slices, and owned [`Tensor`]s.
//!
//! The convention matches the kernel API: a tensor is a set of rows indexed by
//! (batch, head, token), each row `dim` contiguous elements; the three row
//! strides are free, so `[B, H, N, D]` and `[B, N, H, D]` (and padded or
//! packed variants) are described without copies.

use crate::error::{ReferenceError, Result};

/// Largest number of rows [`Layout::validate`] will enumerate to prove that
/// unusually interleaved (non-nested) strides do not overlap.
const MAX_ROWS_TO_ENUMERATE: usize = 1 << 26;

/// Shape and strides of a (batch, heads, tokens, dim) tensor in a flat buffer.
///
/// Element `(b, h, t, x)` lives at `b*batch_stride + h*head_stride +
/// t*token_stride + x`: the last dimension is always contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    /// Number of batch entries (at least 1).
    pub batch: usize,
    /// Number of heads (at least 1).
    pub heads: usize,
    /// Number of tokens (may be 0: an empty sequence).
    pub tokens: usize,
    /// Row length: the key size D or the value size M (at least 1).
    pub dim: usize,
    /// Elements between consecutive batch entries.
    pub batch_stride: usize,
    /// Elements between consecutive tokens.
    pub token_stride: usize,
    /// Elements between consecutive heads.
    pub head_stride: usize,
}

impl Layout {
    /// Contiguous `[B, H, N, D]`: the layout of every dense output of this crate.
    pub fn bhnd(batch: usize, heads: usize, tokens: usize, dim: usize) -> Self {
        let token_stride = dim;
        let head_stride = tokens.saturating_mul(dim);
        let batch_stride = heads.saturating_mul(head_stride);
        Layout {
            batch,
            heads,
            tokens,
            dim,
            batch_stride,
            token_stride,
            head_stride,
        }
    }

    /// Contiguous `[B, N, H, D]` (the usual projection output layout).
    pub fn bnhd(batch: usize, heads: usize, tokens: usize, dim: usize) -> Self {
        let head_stride = dim;
        let token_stride = heads.saturating_mul(dim);
        let batch_stride = tokens.saturating_mul(token_stride);
        Layout {
            batch,
            heads,
            tokens,
            dim,
            batch_stride,
            token_stride,
            head_stride,
        }
    }

    /// FlashAttention's packed varlen layout `[total_tokens, H, D]`, i.e.
    /// `bnhd(1, heads, total_tokens, dim)`; sequences are delimited by
    /// `cu_seqlens` offsets along the token axis.
    pub fn packed(total_tokens: usize, heads: usize, dim: usize) -> Self {
        Self::bnhd(1, heads, total_tokens, dim)
    }

    /// Offset of the first element of row `(b, h, t)`.
    ///
    /// Meaningful for in-range indices of a validated layout; uses wrapping
    /// arithmetic so it never panics.
    #[inline]
    pub fn offset(&self, b: usize, h: usize, t: usize) -> usize {
        b.wrapping_mul(self.batch_stride)
            .wrapping_add(h.wrapping_mul(self.head_stride))
            .wrapping_add(t.wrapping_mul(self.token_stride))
    }

    /// Number of rows, `batch * heads * tokens` (saturating).
    pub fn rows(&self) -> usize {
        self.batch
            .saturating_mul(self.heads)
            .saturating_mul(self.tokens)
    }

    /// Minimum buffer length: one past the last addressed element, or `None`
    /// if that does not fit in `usize`. An empty layout needs 0 elements.
    pub fn required_len(&self) -> Option<usize> {
        if self.batch == 0 || self.heads == 0 || self.tokens == 0 || self.dim == 0 {
            return Some(0);
        }
        let b = (self.batch - 1).checked_mul(self.batch_stride)?;
        let h = (self.heads - 1).checked_mul(self.head_stride)?;
        let t = (self.tokens - 1).checked_mul(self.token_stride)?;
        b.checked_add(h)?.checked_add(t)?.checked_add(self.dim)
    }

    /// Same (batch, heads, tokens) as `other`, whatever the dims and strides.
    pub fn same_rows(&self, other: &Layout) -> bool {
        self.batch == other.batch && self.heads == other.heads && self.tokens == other.tokens
    }

    /// Checks sizes, overflow and overlap; returns [`Layout::required_len`].
    ///
    /// Rejects zero batch, heads or dim (tokens may be 0), offsets that overflow
    /// `usize`, and strides under which two different rows share an element.
    pub fn validate(&self) -> Result<usize> {
        self.check("Layout::validate", "layout")
    }

    /// [`Layout::validate`] with the caller's function and argument names.
    pub(crate) fn check(&self, func: &'static str, arg: &'static str) -> Result<usize> {
        for (n, name) in [
            (self.batch, "batch"),
            (self.heads, "heads"),
            (self.dim, "dim"),
        ] {
            if n == 0 {
                return Err(ReferenceError::ZeroSized {
                    func,
                    arg,
                    dim: name,
                });
            }
        }
        let required = self
            .required_len()
            .ok_or(ReferenceError::StrideOverflow { func, arg })?;
        if self.tokens == 0 {
            return Ok(required);
        }
        self.check_overlap(func, arg, required)?;
        Ok(required)
    }

    fn check_overlap(&self, func: &'static str, arg: &'static str, required: usize) -> Result<()> {
        // Fast path: axes sorted by stride nest (each stride clears the whole
        // extent of the smaller ones), which proves that rows are disjoint.
        let mut axes = [
            (self.batch, self.batch_stride),
            (self.heads, self.head_stride),
            (self.tokens, self.token_stride),
        ];
        axes.sort_by_key(|&(_, s)| s);
        let mut reach = self.dim;
        let mut nested = true;
        for &(n, s) in axes.iter().filter(|(n, _)| *n > 1) {
            if s < reach {
                nested = false;
                break;
            }
            // Cannot overflow: bounded by required_len, which fits.
            reach += (n - 1) * s;
        }
        if nested {
            return Ok(());
        }
        // Pigeonhole: more elements than the span means a collision.
        let rows = self.rows();
        let too_many = rows
            .checked_mul(self.dim)
            .is_none_or(|elems| elems > required);
        if rows > MAX_ROWS_TO_ENUMERATE {
            let detail = if too_many {
                format!(
                    "{rows} rows of dim {} do not fit in a span of {required} elements",
                    self.dim
                )
            } else {
                format!("strides do not nest and {rows} rows are too many to check exhaustively")
            };
            return Err(ReferenceError::OverlappingStrides { func, arg, detail });
        }
        // Exact check: sort every row start and look for two closer than dim.
        let mut starts = Vec::with_capacity(rows);
        for b in 0..self.batch {
            for h in 0..self.heads {
                for t in 0..self.tokens {
                    starts.push((self.offset(b, h, t), (b, h, t)));
                }
            }
        }
        starts.sort_unstable();
        for w in starts.windows(2) {
            if w[1].0 - w[0].0 < self.dim {
                let (a, c) = (w[0].1, w[1].1);
                return Err(ReferenceError::OverlappingStrides {
                    func,
                    arg,
                    detail: format!(
                        "rows (b,h,t) = {a:?} at offset {} and {c:?} at offset {} are less than dim = {} apart",
                        w[0].0, w[1].0, self.dim
                    ),
                });
            }
        }
        Ok(())
    }
}

/// A validated, borrowed view of a flat slice through a [`Layout`].
///
/// This is what every entry point takes, so a kernel test can hand the
/// reference exactly the strided buffer the GPU sees (widened to f64).
#[derive(Debug, Clone, Copy)]
pub struct View<'a, T> {
    data: &'a [T],
    layout: Layout,
}

impl<'a, T> View<'a, T> {
    /// Validates `layout` and checks that `data` is long enough for it.
    pub fn new(data: &'a [T], layout: Layout) -> Result<Self> {
        Self::checked(data, layout, "View::new", "layout")
    }

    pub(crate) fn checked(
        data: &'a [T],
        layout: Layout,
        func: &'static str,
        arg: &'static str,
    ) -> Result<Self> {
        let required = layout.check(func, arg)?;
        if data.len() < required {
            return Err(ReferenceError::BufferTooShort {
                func,
                arg,
                len: data.len(),
                required,
            });
        }
        Ok(View { data, layout })
    }

    /// The layout the view was built with.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The underlying flat slice.
    pub fn data(&self) -> &'a [T] {
        self.data
    }

    /// Row `(b, h, t)`, or `None` if an index is out of range.
    pub fn row(&self, b: usize, h: usize, t: usize) -> Option<&'a [T]> {
        let l = &self.layout;
        (b < l.batch && h < l.heads && t < l.tokens).then(|| self.r(b, h, t))
    }

    /// The sub-view of tokens `t0..t1` (all batches and heads), without copying;
    /// `None` unless `t0 <= t1 <= tokens`. Handy to split a sequence and resume.
    pub fn slice_tokens(&self, t0: usize, t1: usize) -> Option<View<'a, T>> {
        if t0 > t1 || t1 > self.layout.tokens {
            return None;
        }
        let layout = Layout {
            tokens: t1 - t0,
            ..self.layout
        };
        let data = if t0 == t1 {
            &self.data[..0]
        } else {
            &self.data[self.layout.offset(0, 0, t0)..]
        };
        Some(View { data, layout })
    }

    /// Row access for in-range indices (validated at construction).
    #[inline(always)]
    pub(crate) fn r(&self, b: usize, h: usize, t: usize) -> &'a [T] {
        let o = self.layout.offset(b, h, t);
        &self.data[o..o + self.layout.dim]
    }
}

/// An owned tensor with its layout; outputs of this crate are contiguous
/// `[B, H, N, dim]` ([`Layout::bhnd`]) or packed `[T, H, dim]` for varlen.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor<T> {
    data: Vec<T>,
    layout: Layout,
}

impl<T: Copy + Default> Tensor<T> {
    /// A zero-filled (`T::default()`) tensor of the given layout.
    pub fn zeros(layout: Layout) -> Result<Self> {
        let required = layout.check("Tensor::zeros", "layout")?;
        Ok(Tensor {
            data: vec![T::default(); required],
            layout,
        })
    }

    /// Wraps an existing buffer after validating the layout against it.
    pub fn from_vec(data: Vec<T>, layout: Layout) -> Result<Self> {
        View::checked(&data, layout, "Tensor::from_vec", "data")?;
        Ok(Tensor { data, layout })
    }

    /// The tensor's layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The flat buffer, in [`Tensor::layout`] order.
    pub fn data(&self) -> &[T] {
        &self.data
    }

    /// Consumes the tensor, returning its flat buffer.
    pub fn into_vec(self) -> Vec<T> {
        self.data
    }

    /// A borrowed view, to feed an output back into another entry point.
    pub fn view(&self) -> View<'_, T> {
        View {
            data: &self.data,
            layout: self.layout,
        }
    }

    /// Row `(b, h, t)`, or `None` if out of range.
    pub fn row(&self, b: usize, h: usize, t: usize) -> Option<&[T]> {
        self.view().row(b, h, t)
    }

    #[inline(always)]
    pub(crate) fn row_mut(&mut self, b: usize, h: usize, t: usize) -> &mut [T] {
        let o = self.layout.offset(b, h, t);
        &mut self.data[o..o + self.layout.dim]
    }

    /// Copies the tensor into `out`, laid out as `layout` (same shape, any
    /// strides): how a test compares against a kernel's strided output.
    /// Elements of `out` that `layout` does not address are left untouched.
    pub fn write_into(&self, out: &mut [T], layout: &Layout) -> Result<()> {
        const F: &str = "Tensor::write_into";
        let required = layout.check(F, "layout")?;
        if !layout.same_rows(&self.layout) || layout.dim != self.layout.dim {
            return Err(ReferenceError::ShapeMismatch {
                func: F,
                arg: "layout",
                expected: shape_str(&self.layout),
                found: shape_str(layout),
            });
        }
        if out.len() < required {
            return Err(ReferenceError::BufferTooShort {
                func: F,
                arg: "out",
                len: out.len(),
                required,
            });
        }
        let l = self.layout;
        for b in 0..l.batch {
            for h in 0..l.heads {
                for t in 0..l.tokens {
                    let o = layout.offset(b, h, t);
                    out[o..o + l.dim].copy_from_slice(self.view().r(b, h, t));
                }
            }
        }
        Ok(())
    }

    /// Returns a new buffer of `layout.required_len()` elements holding this
    /// tensor in `layout` (gaps filled with `T::default()`).
    pub fn to_layout(&self, layout: &Layout) -> Result<Vec<T>> {
        let required = layout.check("Tensor::to_layout", "layout")?;
        let mut out = vec![T::default(); required];
        self.write_into(&mut out, layout)?;
        Ok(out)
    }

    /// Element-wise conversion, e.g. `f32` output to `f64` for comparison.
    pub fn map<U: Copy + Default>(&self, f: impl Fn(T) -> U) -> Tensor<U> {
        Tensor {
            data: self.data.iter().map(|&x| f(x)).collect(),
            layout: self.layout,
        }
    }
}

/// Human-readable shape of a layout for error messages.
pub(crate) fn shape_str(l: &Layout) -> String {
    format!(
        "shape (batch {}, heads {}, tokens {}, dim {})",
        l.batch, l.heads, l.tokens, l.dim
    )
}
