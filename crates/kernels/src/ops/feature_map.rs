//! `feature_map.cu`: materialise phi(x) for callers who want it outside the
//! fused attention kernels. Element-wise over a strided `rows x cols` view.

use super::checks::{MAX_GRID_X, MAX_GRID_Y};
use super::memory::{Addrs, DeviceRead, DeviceWrite, Memory};
use crate::dtype::{DType, Element};
use crate::params::LinattnFeatureMapParams;
use crate::plan::{div_ceil_u64, Executor, LaunchPlan};
use crate::{Error, FeatureMap, Result};

const KERNEL: &str = "feature_map";
/// Threads per block and elements per thread, as in `feature_map.cu`.
const THREADS: u32 = 256;
const ITEMS: u64 = 4;

/// A strided 2-D view: `rows` rows of `cols` contiguous elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowsShape {
    /// Number of rows.
    pub rows: usize,
    /// Contiguous elements per row.
    pub cols: usize,
    /// Elements between the starts of consecutive input rows (>= cols).
    pub x_row_stride: usize,
    /// Elements between the starts of consecutive output rows (>= cols).
    pub y_row_stride: usize,
}

impl RowsShape {
    /// A contiguous `rows x cols` matrix for input and output.
    pub fn contiguous(rows: usize, cols: usize) -> Self {
        RowsShape {
            rows,
            cols,
            x_row_stride: cols,
            y_row_stride: cols,
        }
    }

    /// Elements a buffer must hold for a view with this row stride.
    fn span(&self, stride: usize) -> Option<usize> {
        if self.rows == 0 || self.cols == 0 {
            return Some(0);
        }
        (self.rows - 1).checked_mul(stride)?.checked_add(self.cols)
    }

    /// Checks the shape against buffer lengths; returns whether there is work.
    pub fn validate(&self, x_len: usize, y_len: usize) -> Result<bool> {
        let limit = i64::MAX as usize;
        for (arg, stride) in [
            ("x_row_stride", self.x_row_stride),
            ("y_row_stride", self.y_row_stride),
        ] {
            if self.rows > 1 && stride < self.cols {
                return Err(Error::invalid(KERNEL, arg, format!("row stride {stride} is smaller than the row length {} (rows would overlap)", self.cols)));
            }
        }
        let x_need = self.span(self.x_row_stride).filter(|&n| n <= limit);
        let y_need = self.span(self.y_row_stride).filter(|&n| n <= limit);
        let x_need = x_need.ok_or_else(|| {
            Error::invalid(KERNEL, "x", "the view's extent overflows 64-bit indexing")
        })?;
        let y_need = y_need.ok_or_else(|| {
            Error::invalid(KERNEL, "y", "the view's extent overflows 64-bit indexing")
        })?;
        if x_len < x_need {
            return Err(Error::invalid(
                KERNEL,
                "x",
                format!("buffer holds {x_len} elements, the view needs {x_need}"),
            ));
        }
        if y_len < y_need {
            return Err(Error::invalid(
                KERNEL,
                "y",
                format!("buffer holds {y_len} elements, the view needs {y_need}"),
            ));
        }
        let col_blocks = div_ceil_u64(self.cols as u64, THREADS as u64 * ITEMS);
        if col_blocks > MAX_GRID_X as u64 {
            return Err(Error::invalid(
                KERNEL,
                "cols",
                format!("{} columns exceed the grid limit", self.cols),
            ));
        }
        Ok(self.rows > 0 && self.cols > 0)
    }
}

/// The kernel symbol for a dtype.
pub fn kernel_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "feature_map_f32",
        DType::F16 => "feature_map_f16",
        DType::Bf16 => "feature_map_bf16",
    }
}

/// Builds the launch for an already validated, non-empty shape.
pub fn plan(
    dtype: DType,
    shape: &RowsShape,
    map: FeatureMap,
    x: u64,
    y: u64,
) -> LaunchPlan<LinattnFeatureMapParams> {
    let col_blocks = div_ceil_u64(shape.cols as u64, THREADS as u64 * ITEMS) as u32;
    let row_blocks = (shape.rows as u64).min(MAX_GRID_Y as u64) as u32;
    LaunchPlan {
        module: KERNEL,
        kernel: kernel_name(dtype),
        grid: [col_blocks, row_blocks, 1],
        block: [THREADS, 1, 1],
        shared_bytes: 0,
        params: LinattnFeatureMapParams {
            x,
            y,
            rows: shape.rows as i64,
            cols: shape.cols as i64,
            x_row_stride: shape.x_row_stride as i64,
            y_row_stride: shape.y_row_stride as i64,
            feature_map: map.to_c(),
            _pad0: 0,
        },
    }
}

/// y = phi(x), elementwise over a strided 2-D view.
///
/// `exec` is a [`crate::Device`] (memory: [`crate::Buffer`]s) or a
/// [`crate::Gpu`] (cudarc slices or views). Errors:
/// [`crate::Error::InvalidArgument`] naming the argument for a bad view,
/// a short buffer or memory of another device.
pub fn feature_map<E, T, X, Y>(
    exec: &E,
    x: &X,
    y: &mut Y,
    shape: &RowsShape,
    map: FeatureMap,
) -> Result<()>
where
    E: Memory,
    T: Element,
    X: DeviceRead<T, E>,
    Y: DeviceWrite<T, E>,
{
    if !shape.validate(x.elems(), y.elems())? {
        return Ok(());
    }
    let y_bytes = y.elems() * std::mem::size_of::<T>();
    let mut a = Addrs::new(exec, KERNEL);
    let (xp, yp) = (a.read(x, "x")?, a.write(y, "y")?);
    // SAFETY: both addresses are memory of `exec` and the lengths were validated.
    unsafe { exec.launch_writing(&plan(T::DTYPE, shape, map, xp, yp), &[(yp, y_bytes)]) }
}

/// y = phi(x) on raw device addresses, for engines that manage their own memory.
///
/// # Safety
/// `x` must address at least `(rows-1)*x_row_stride + cols` readable elements
/// of `dtype` and `y` as many writable ones (with `y_row_stride`), in memory
/// the executor can reach (device memory of the GPU's context, host memory for
/// the emulator), and stay valid until the launch completes. `y` may equal `x`
/// with equal row strides (in place); any other overlap of the two views'
/// address ranges is refused (checked).
pub unsafe fn feature_map_raw<E: Executor>(
    exec: &E,
    dtype: DType,
    x: u64,
    y: u64,
    shape: &RowsShape,
    map: FeatureMap,
) -> Result<()> {
    if !shape.validate(usize::MAX, usize::MAX)? {
        return Ok(());
    }
    if x == 0 || y == 0 {
        return Err(Error::invalid(
            KERNEL,
            if x == 0 { "x" } else { "y" },
            "null pointer",
        ));
    }
    check_aliasing(shape, dtype, x, y)?;
    // SAFETY: forwarded to the caller.
    unsafe { exec.launch(&plan(dtype, shape, map, x, y)) }
}

/// In place (`y == x`) needs equal row strides (each element is then read
/// and written by one thread); any other overlap of the byte ranges would
/// let one thread overwrite what another still has to read.
fn check_aliasing(shape: &RowsShape, dtype: DType, x: u64, y: u64) -> Result<()> {
    let bytes = |stride| {
        shape
            .span(stride)
            .map_or(u64::MAX, |n| (n as u64).saturating_mul(dtype.size() as u64))
    };
    let (xb, yb) = (bytes(shape.x_row_stride), bytes(shape.y_row_stride));
    if x == y {
        if shape.rows > 1 && shape.x_row_stride != shape.y_row_stride {
            return Err(Error::invalid(
                KERNEL,
                "y",
                format!(
                    "in place (y == x) needs equal row strides, found x_row_stride {} and y_row_stride {}",
                    shape.x_row_stride, shape.y_row_stride
                ),
            ));
        }
        return Ok(());
    }
    if x < y.saturating_add(yb) && y < x.saturating_add(xb) {
        return Err(Error::invalid(
            KERNEL,
            "y",
            format!(
                "y (0x{y:x}, {yb} bytes) partly overlaps x (0x{x:x}, {xb} bytes); only y == x with equal row strides (in place) may alias"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_covers_every_element_once() {
        for (rows, cols) in [(1, 1), (3, 1023), (2, 1024), (5, 1025), (70_000, 7)] {
            let s = RowsShape::contiguous(rows, cols);
            assert!(s.validate(rows * cols, rows * cols).unwrap());
            let p = plan(DType::F16, &s, FeatureMap::Relu, 16, 32);
            let covered_cols = p.grid[0] as u64 * THREADS as u64 * ITEMS;
            assert!(
                covered_cols >= cols as u64
                    && covered_cols - (cols as u64) < THREADS as u64 * ITEMS
            );
            assert!(p.grid[1] as usize <= MAX_GRID_Y && p.grid[1] >= 1);
            assert_eq!(p.kernel, "feature_map_f16");
            assert_eq!(p.params.feature_map, FeatureMap::Relu.to_c());
        }
    }

    #[test]
    fn rejects_short_buffers_and_overlapping_rows() {
        let s = RowsShape {
            rows: 4,
            cols: 8,
            x_row_stride: 10,
            y_row_stride: 8,
        };
        assert!(s.validate(38, 32).unwrap());
        let e = s.validate(37, 32).unwrap_err().to_string();
        assert!(e.contains("`x`") && e.contains("needs 38"), "{e}");
        let e = s.validate(38, 31).unwrap_err().to_string();
        assert!(e.contains("`y`"), "{e}");
        let bad = RowsShape {
            rows: 2,
            cols: 8,
            x_row_stride: 7,
            y_row_stride: 8,
        };
        assert!(bad
            .validate(100, 100)
            .unwrap_err()
            .to_string()
            .contains("overlap"));
        let huge = RowsShape {
            rows: usize::MAX / 2,
            cols: 8,
            x_row_stride: 16,
            y_row_stride: 8,
        };
        assert!(huge
            .validate(usize::MAX, usize::MAX)
            .unwrap_err()
            .to_string()
            .contains("overflows"));
    }

    #[test]
    fn empty_views_do_nothing() {
        assert!(!RowsShape::contiguous(0, 5).validate(0, 0).unwrap());
        assert!(!RowsShape::contiguous(5, 0).validate(0, 0).unwrap());
    }

    #[test]
    fn aliasing_other_than_in_place_is_refused() {
        let s = RowsShape {
            rows: 3,
            cols: 5,
            x_row_stride: 7,
            y_row_stride: 7,
        };
        // 19 f32 elements: 76 bytes from 0x1000.
        assert!(check_aliasing(&s, DType::F32, 0x1000, 0x1000).is_ok());
        assert!(check_aliasing(&s, DType::F32, 0x1000, 0x1000 + 76).is_ok());
        assert!(check_aliasing(&s, DType::F32, 0x1000 + 76, 0x1000).is_ok());
        for y in [0x1000 + 4, 0x1000 + 72, 0x1000 - 72] {
            let e = check_aliasing(&s, DType::F32, 0x1000, y).unwrap_err();
            assert!(e.to_string().contains("partly overlaps"), "{e}");
        }
        let other = RowsShape {
            y_row_stride: 8,
            ..s
        };
        let e = check_aliasing(&other, DType::F32, 0x1000, 0x1000).unwrap_err();
        assert!(e.to_string().contains("equal row strides"), "{e}");
        // One row: the strides never matter.
        let one = RowsShape { rows: 1, ..other };
        assert!(check_aliasing(&one, DType::F32, 0x1000, 0x1000).is_ok());
    }

    /// In place on the emulator: every element of the view becomes phi of
    /// itself, the gaps between rows stay as they were (NaN), all dtypes.
    #[cfg(feature = "emulator")]
    #[test]
    fn in_place_matches_phi() {
        fn run<T: Element>(emu: &crate::Emulator) {
            let s = RowsShape {
                rows: 5,
                cols: 1100,
                x_row_stride: 1103,
                y_row_stride: 1103,
            };
            let len = (s.rows - 1) * s.x_row_stride + s.cols;
            let mut buf: Vec<T> = (0..len)
                .map(|i| {
                    if i % s.x_row_stride < s.cols {
                        T::from_f64(((i * 7919) % 601) as f64 / 100.0 - 3.0)
                    } else {
                        T::nan()
                    }
                })
                .collect();
            let before = buf.clone();
            let p = buf.as_mut_ptr() as u64;
            for map in [FeatureMap::EluPlusOne, FeatureMap::Relu] {
                buf.copy_from_slice(&before);
                // SAFETY: `buf` covers the view; y == x with equal strides.
                unsafe { feature_map_raw(emu, T::DTYPE, p, p, &s, map) }.unwrap();
                let (mut got, mut want) = (Vec::new(), Vec::new());
                for (i, (&a, &b)) in buf.iter().zip(&before).enumerate() {
                    if i % s.x_row_stride < s.cols {
                        got.push(a.to_f64());
                        want.push(T::from_f64(map.apply(b.to_f64())).to_f64());
                    } else {
                        assert!(a.to_f64().is_nan(), "{map:?}: wrote the gap at {i}");
                    }
                }
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| ((g - w) / w.abs().max(1e-30)).abs())
                    .fold(
                        0f64,
                        |a, e| if e.is_nan() { f64::INFINITY } else { a.max(e) },
                    );
                let tol = if T::DTYPE == DType::F32 { 1e-6 } else { 8e-3 };
                assert!(
                    worst < tol,
                    "{:?} {map:?}: worst relative error {worst:e}",
                    T::DTYPE
                );
            }
        }
        let emu = crate::Emulator::checked().unwrap();
        run::<f32>(&emu);
        run::<half::f16>(&emu);
        run::<half::bf16>(&emu);
    }
}
