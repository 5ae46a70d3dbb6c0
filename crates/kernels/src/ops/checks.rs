//! The validation every op shares, in one copy: buffer extents, rows that
//! never overlap, address ranges that must not overlap, grid limits and
//! head sizes. Each op's `plan` module calls these with its own tensors.

use super::attention::MAX_DIM;
use crate::{Error, Result};

/// Largest grid x extent (blocks) of a launch: `2^31 - 1`.
pub(crate) const MAX_GRID_X: usize = i32::MAX as usize;
/// Largest grid y (and z) extent of a launch.
pub(crate) const MAX_GRID_Y: usize = 65_535;

/// Elements a buffer needs for `counts = [batch, heads, tokens]` rows of
/// `dim` elements at `strides = [batch, head, token]` (0 when any count is
/// 0; None on overflow or past 64-bit indexing).
pub(crate) fn span(counts: [usize; 3], strides: [usize; 3], dim: usize) -> Option<usize> {
    if counts.contains(&0) {
        return Some(0);
    }
    let mut need = dim;
    for (n, s) in counts.into_iter().zip(strides) {
        need = need.checked_add((n - 1).checked_mul(s)?)?;
    }
    Some(need).filter(|&n| n <= i64::MAX as usize)
}

/// Whether rows of `dim` elements, at `(count, stride)` per axis, can never
/// share an element: sorted by stride, each stride must clear the extent of
/// the smaller axes. Conservative (interleavings that happen not to collide
/// are rejected), which is fine for an output.
pub(crate) fn rows_disjoint(axes: &[(usize, usize)], dim: usize) -> bool {
    // No rows at all (e.g. an empty dense piece, whose packed strides are 0).
    if axes.iter().any(|&(n, _)| n == 0) {
        return true;
    }
    let mut axes: Vec<(usize, usize)> = axes.iter().copied().filter(|&(n, _)| n > 1).collect();
    axes.sort_by_key(|&(_, s)| s);
    let mut reach = dim;
    for (n, s) in axes {
        if s < reach {
            return false;
        }
        reach = reach.saturating_add((n - 1).saturating_mul(s));
    }
    true
}

/// The bytes `[start, end)` a buffer of `elems` elements of `size` bytes at
/// `p` covers; an absent (null) buffer covers none.
pub(crate) fn byte_range(p: u64, elems: usize, size: usize) -> (u64, u64) {
    if p == 0 {
        return (0, 0);
    }
    (
        p,
        p.saturating_add((elems as u64).saturating_mul(size as u64)),
    )
}

/// Whether two non-empty byte ranges share a byte.
pub(crate) fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1 && a.0 != a.1 && b.0 != b.1
}

/// A named byte range ([`byte_range`]).
pub(crate) type Region = (&'static str, (u64, u64));

/// Every output range disjoint from every input and from every other
/// output; the error names the first output that overlaps and what.
pub(crate) fn outputs_disjoint(
    kernel: &'static str,
    inputs: &[Region],
    outputs: &[Region],
) -> Result<()> {
    for (i, (oa, orng)) in outputs.iter().enumerate() {
        for (ia, irng) in inputs.iter().chain(outputs[i + 1..].iter()) {
            if overlaps(*orng, *irng) {
                return Err(Error::invalid(
                    kernel,
                    oa,
                    format!("output overlaps `{ia}`"),
                ));
            }
        }
    }
    Ok(())
}

/// Every required address non-null (when the call has work at all).
pub(crate) fn non_null(kernel: &'static str, ptrs: &[(&'static str, u64)]) -> Result<()> {
    match ptrs.iter().find(|(_, p)| *p == 0) {
        Some((arg, _)) => Err(Error::invalid(kernel, arg, "null pointer")),
        None => Ok(()),
    }
}

/// State pairs: S and z given together or not at all.
pub(crate) fn pairs(kernel: &'static str, pairs: &[(&'static str, u64, u64)]) -> Result<()> {
    match pairs.iter().find(|(_, s, z)| (*s == 0) != (*z == 0)) {
        Some((arg, _, _)) => Err(Error::invalid(
            kernel,
            arg,
            "S and z must be given together (both or neither)",
        )),
        None => Ok(()),
    }
}

/// A raw call's workspace: present and at least `need` fp32 elements when
/// the call needs one.
pub(crate) fn workspace(kernel: &'static str, p: u64, len: usize, need: usize) -> Result<()> {
    if need > 0 && (p == 0 || len < need) {
        return Err(Error::invalid(
            kernel,
            "workspace",
            format!(
                "this call needs a workspace of {need} fp32 elements, {} given",
                if p == 0 { 0 } else { len }
            ),
        ));
    }
    Ok(())
}

/// A buffer of `len` elements holds the `need` a view asks for.
pub(crate) fn holds(
    kernel: &'static str,
    arg: &'static str,
    len: usize,
    need: usize,
) -> Result<()> {
    if len < need {
        return Err(Error::invalid(
            kernel,
            arg,
            format!("buffer holds {len} elements, the shape and strides need {need}"),
        ));
    }
    Ok(())
}

/// A key or value size in `1..=MAX_DIM`.
pub(crate) fn dim(kernel: &'static str, arg: &'static str, v: usize) -> Result<()> {
    if v == 0 || v > MAX_DIM {
        return Err(Error::invalid(
            kernel,
            arg,
            format!("{arg} = {v}; supported sizes are 1..={MAX_DIM}"),
        ));
    }
    Ok(())
}

/// Whether `rows * per_row` blocks fit the grid's x extent.
pub(crate) fn grid_x_fits(rows: usize, per_row: usize) -> bool {
    rows.checked_mul(per_row).is_some_and(|b| b <= MAX_GRID_X)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_counts_the_last_element_and_empty_views() {
        assert_eq!(span([2, 3, 4], [60, 20, 5], 5), Some(60 + 40 + 15 + 5));
        assert_eq!(span([2, 0, 4], [60, 20, 5], 5), Some(0));
        assert_eq!(span([2, 1, 1], [usize::MAX, 0, 0], 1), None);
        assert_eq!(span([1, 1, 2], [0, 0, i64::MAX as usize], 1), None);
    }

    #[test]
    fn rows_overlap_only_when_a_stride_is_short() {
        assert!(rows_disjoint(&[(2, 40), (4, 10)], 10));
        assert!(!rows_disjoint(&[(2, 40), (4, 9)], 10));
        assert!(!rows_disjoint(&[(2, 30), (4, 10)], 10));
        // Axes of one entry never collide.
        assert!(rows_disjoint(&[(1, 0), (3, 16)], 16));
        // No rows at all: an empty dense batch's contiguous strides are 0.
        assert!(rows_disjoint(&[(2, 0), (2, 0), (0, 16)], 16));
        assert!(!rows_disjoint(&[(2, 0), (2, 0), (1, 16)], 16));
    }

    #[test]
    fn ranges_and_outputs() {
        let (a, b) = (byte_range(100, 10, 4), byte_range(140, 1, 4));
        assert_eq!(a, (100, 140));
        assert!(!overlaps(a, b));
        assert!(overlaps(a, byte_range(139, 1, 1)));
        assert!(!overlaps(a, byte_range(0, 10, 4)), "null covers nothing");
        let e = outputs_disjoint("k", &[("x", a)], &[("y", (120, 130))]).unwrap_err();
        assert!(e.to_string().contains("output overlaps `x`"), "{e}");
        let e = outputs_disjoint("k", &[], &[("y", a), ("z", (120, 130))]).unwrap_err();
        assert!(e.to_string().contains("output overlaps `z`"), "{e}");
        assert!(outputs_disjoint("k", &[("x", a)], &[("y", b)]).is_ok());
    }

    #[test]
    fn small_checks() {
        assert!(non_null("k", &[("a", 1), ("b", 0)]).is_err());
        assert!(pairs("k", &[("s", 1, 0)]).is_err());
        assert!(pairs("k", &[("s", 1, 1), ("t", 0, 0)]).is_ok());
        assert!(workspace("k", 0, 0, 1).is_err());
        assert!(workspace("k", 8, 3, 4).is_err());
        assert!(workspace("k", 0, 0, 0).is_ok());
        assert!(holds("k", "q", 3, 4).is_err());
        assert!(dim("k", "d", 0).is_err() && dim("k", "d", MAX_DIM + 1).is_err());
        assert!(grid_x_fits(MAX_GRID_X, 1) && !grid_x_fits(MAX_GRID_X, 2));
    }
}
