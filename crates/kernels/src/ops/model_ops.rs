//! `model_ops.cu`: the transformer's element-wise and row ops in f32, on
//! contiguous `[rows, cols]` matrices: LayerNorm, bias + GELU (tanh
//! approximation), residual add, and token embedding plus sinusoidal
//! positions. The formulas are those of the CPU model (`linattn-model`).
//!
//! Buffers may be longer than `rows * cols`; the ops touch the first
//! `rows * cols` elements.

use crate::params::{LinattnEmbedParams, LinattnLayerNormParams, LinattnRowsParams};
use crate::plan::{div_ceil_u64, Executor, LaunchPlan};
use crate::{Buffer, Device, Error, Result};

const MODULE: &str = "model_ops";
/// Threads per block of every kernel in `model_ops.cu`.
pub const THREADS: u32 = 256;
/// Most blocks of a grid-stride launch (each block then loops).
const MAX_BLOCKS: u64 = 65_535;

/// Token ids travel to the GPU as f32 values, exact below 2^24.
pub const MAX_VOCAB: usize = 1 << 24;

/// A contiguous `[rows, cols]` f32 matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rows {
    /// Number of rows.
    pub rows: usize,
    /// Elements per row (the row stride).
    pub cols: usize,
}

impl Rows {
    /// `rows x cols`.
    pub fn new(rows: usize, cols: usize) -> Self {
        Rows { rows, cols }
    }

    /// Elements covered, or an error if the count overflows 64-bit indexing.
    fn elements(&self, kernel: &'static str) -> Result<usize> {
        self.rows
            .checked_mul(self.cols)
            .filter(|&n| n <= i64::MAX as usize)
            .ok_or_else(|| {
                Error::invalid(
                    kernel,
                    "rows",
                    format!(
                        "{} x {} elements overflow 64-bit indexing",
                        self.rows, self.cols
                    ),
                )
            })
    }

    /// Checks that every buffer `(name, len, needed)` is long enough.
    fn check(kernel: &'static str, bufs: &[(&'static str, usize, usize)]) -> Result<()> {
        for &(arg, len, need) in bufs {
            if len < need {
                return Err(Error::invalid(
                    kernel,
                    arg,
                    format!("buffer holds {len} elements, the op needs {need}"),
                ));
            }
        }
        Ok(())
    }
}

fn grid_for(elements: u64) -> u32 {
    div_ceil_u64(elements, THREADS as u64).clamp(1, MAX_BLOCKS) as u32
}

/// LayerNorm launch: one block per row (grid-stride past 65535 rows).
pub fn plan_layer_norm(
    shape: &Rows,
    eps: f32,
    x: u64,
    y: u64,
    gain: u64,
    bias: u64,
) -> LaunchPlan<LinattnLayerNormParams> {
    LaunchPlan {
        module: MODULE,
        kernel: "layer_norm_f32",
        grid: [(shape.rows as u64).clamp(1, MAX_BLOCKS) as u32, 1, 1],
        block: [THREADS, 1, 1],
        shared_bytes: 0,
        params: LinattnLayerNormParams {
            x,
            y,
            gain,
            bias,
            rows: shape.rows as i64,
            cols: shape.cols as i64,
            eps,
            _pad0: 0,
        },
    }
}

/// Element-wise launch over `rows * cols` (`bias_gelu_f32` or `add_residual_f32`).
pub fn plan_rows(
    kernel: &'static str,
    shape: &Rows,
    x: u64,
    y: u64,
    bias: u64,
) -> LaunchPlan<LinattnRowsParams> {
    LaunchPlan {
        module: MODULE,
        kernel,
        grid: [grid_for(shape.rows as u64 * shape.cols as u64), 1, 1],
        block: [THREADS, 1, 1],
        shared_bytes: 0,
        params: LinattnRowsParams {
            x,
            y,
            bias,
            rows: shape.rows as i64,
            cols: shape.cols as i64,
        },
    }
}

/// Embedding launch over `rows * cols` output elements.
pub fn plan_embed(
    shape: &Rows,
    vocab: usize,
    start: u64,
    tokens: u64,
    table: u64,
    x: u64,
) -> LaunchPlan<LinattnEmbedParams> {
    LaunchPlan {
        module: MODULE,
        kernel: "embed_positions_f32",
        grid: [grid_for(shape.rows as u64 * shape.cols as u64), 1, 1],
        block: [THREADS, 1, 1],
        shared_bytes: 0,
        params: LinattnEmbedParams {
            tokens,
            table,
            x,
            rows: shape.rows as i64,
            cols: shape.cols as i64,
            vocab: vocab as i64,
            start: start as i64,
        },
    }
}

/// `y[r] = (x[r] - mean) / sqrt(var + eps) * gain + bias` for each row, with
/// fp32 row statistics. `gain` and `bias` hold `cols` values.
pub fn layer_norm(
    dev: &Device,
    x: &Buffer<f32>,
    y: &mut Buffer<f32>,
    gain: &Buffer<f32>,
    bias: &Buffer<f32>,
    shape: &Rows,
    eps: f32,
) -> Result<()> {
    const K: &str = "layer_norm_f32";
    let n = shape.elements(K)?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::invalid(
            K,
            "eps",
            format!("{eps} is not a finite non-negative number"),
        ));
    }
    Rows::check(
        K,
        &[
            ("x", x.len(), n),
            ("y", y.len(), n),
            ("gain", gain.len(), shape.cols),
            ("bias", bias.len(), shape.cols),
        ],
    )?;
    if n == 0 {
        return Ok(());
    }
    let (xp, _gx) = x.read_ptr(dev, K, "x")?;
    let (gp, _gg) = gain.read_ptr(dev, K, "gain")?;
    let (bp, _gb) = bias.read_ptr(dev, K, "bias")?;
    let (yp, _gy) = y.write_ptr(dev, K, "y")?;
    let plan = plan_layer_norm(shape, eps, xp, yp, gp, bp);
    // SAFETY: all pointers belong to `dev`; lengths validated above.
    unsafe { dev.launch_writing(&plan, &[(yp, n * 4)]) }
}

/// `x = gelu(x + bias[col])` in place, GELU in its tanh approximation
/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
pub fn bias_gelu(
    dev: &Device,
    x: &mut Buffer<f32>,
    bias: &Buffer<f32>,
    shape: &Rows,
) -> Result<()> {
    const K: &str = "bias_gelu_f32";
    let n = shape.elements(K)?;
    Rows::check(K, &[("x", x.len(), n), ("bias", bias.len(), shape.cols)])?;
    if n == 0 {
        return Ok(());
    }
    let (bp, _gb) = bias.read_ptr(dev, K, "bias")?;
    let (xp, _gx) = x.write_ptr(dev, K, "x")?;
    let plan = plan_rows(K, shape, xp, 0, bp);
    // SAFETY: pointers of `dev`; lengths validated.
    unsafe { dev.launch_writing(&plan, &[(xp, n * 4)]) }
}

/// `x += y (+ bias[col])` in place.
pub fn add_residual(
    dev: &Device,
    x: &mut Buffer<f32>,
    y: &Buffer<f32>,
    bias: Option<&Buffer<f32>>,
    shape: &Rows,
) -> Result<()> {
    const K: &str = "add_residual_f32";
    let n = shape.elements(K)?;
    Rows::check(K, &[("x", x.len(), n), ("y", y.len(), n)])?;
    if let Some(b) = bias {
        Rows::check(K, &[("bias", b.len(), shape.cols)])?;
    }
    if n == 0 {
        return Ok(());
    }
    let (yp, _gy) = y.read_ptr(dev, K, "y")?;
    let (bp, _gb) = match bias {
        Some(b) => {
            let (p, g) = b.read_ptr(dev, K, "bias")?;
            (p, Some(g))
        }
        None => (0, None),
    };
    let (xp, _gx) = x.write_ptr(dev, K, "x")?;
    let plan = plan_rows(K, shape, xp, yp, bp);
    // SAFETY: pointers of `dev`; lengths validated.
    unsafe { dev.launch_writing(&plan, &[(xp, n * 4)]) }
}

/// `x[t] = table[tokens[t]] + pe(start + t)` for `tokens.len()` rows of
/// `cols`, with the sinusoidal `pe(p, 2i) = sin(p * 10000^(-2i/cols))`,
/// `pe(p, 2i+1) = cos(same)` computed in fp32 (angle error about
/// `p * 2^-24` radians; `start + tokens.len()` must stay below 2^24).
/// `table` is `[vocab, cols]`; every token must be below `vocab`.
pub fn embed_positions(
    dev: &Device,
    tokens: &[u32],
    table: &Buffer<f32>,
    vocab: usize,
    x: &mut Buffer<f32>,
    cols: usize,
    start: usize,
) -> Result<()> {
    const K: &str = "embed_positions_f32";
    let shape = Rows::new(tokens.len(), cols);
    let n = shape.elements(K)?;
    if vocab == 0 || vocab > MAX_VOCAB {
        return Err(Error::invalid(
            K,
            "vocab",
            format!("{vocab} is not in 1..={MAX_VOCAB}"),
        ));
    }
    if let Some((i, &t)) = tokens
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab)
    {
        return Err(Error::invalid(
            K,
            "tokens",
            format!("token {i} is {t}, not below the vocabulary size {vocab}"),
        ));
    }
    if start
        .checked_add(tokens.len())
        .is_none_or(|end| end > MAX_VOCAB)
    {
        return Err(Error::invalid(
            K,
            "start",
            format!(
                "positions {start}..{start}+{} exceed the fp32-exact range 2^24",
                tokens.len()
            ),
        ));
    }
    let table_need = vocab
        .checked_mul(cols)
        .ok_or_else(|| Error::invalid(K, "table", "vocab x cols overflows"))?;
    Rows::check(K, &[("table", table.len(), table_need), ("x", x.len(), n)])?;
    if n == 0 {
        return Ok(());
    }
    let ids: Vec<f32> = tokens.iter().map(|&t| t as f32).collect();
    let ids = dev.upload(&ids)?;
    let (ip, _gi) = ids.read_ptr(dev, K, "tokens")?;
    let (tp, _gt) = table.read_ptr(dev, K, "table")?;
    let (xp, _gx) = x.write_ptr(dev, K, "x")?;
    let plan = plan_embed(&shape, vocab, start as u64, ip, tp, xp);
    // SAFETY: pointers of `dev`; lengths and token ids validated.
    unsafe { dev.launch_writing(&plan, &[(xp, n * 4)]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_plans_cover_every_element() {
        for (rows, cols) in [(1, 1), (3, 17), (1, 1000), (4096, 4096), (1 << 20, 1000)] {
            let s = Rows::new(rows, cols);
            let p = plan_rows("bias_gelu_f32", &s, 8, 0, 16);
            let total = (rows * cols) as u64;
            let threads = p.blocks() * p.threads_per_block();
            // Either one thread per element or the grid is capped and strides.
            assert!(
                threads >= total || p.grid[0] as u64 == MAX_BLOCKS,
                "{rows}x{cols}"
            );
            assert!(p.grid[0] >= 1 && p.grid[0] as u64 <= MAX_BLOCKS);
            assert_eq!((p.params.rows, p.params.cols), (rows as i64, cols as i64));
            let e = plan_embed(&s, 256, 7, 1, 2, 3);
            assert_eq!(e.grid, p.grid);
            assert_eq!((e.params.vocab, e.params.start), (256, 7));
        }
    }

    #[test]
    fn layer_norm_plan_is_one_block_per_row_up_to_the_cap() {
        for rows in [1usize, 5, 65_535, 70_000] {
            let p = plan_layer_norm(&Rows::new(rows, 33), 1e-5, 1, 2, 3, 4);
            assert_eq!(p.grid[0] as u64, (rows as u64).min(MAX_BLOCKS));
            assert_eq!(p.block, [THREADS, 1, 1]);
            assert_eq!(THREADS % 32, 0);
            assert_eq!(p.params.eps, 1e-5);
        }
    }

    #[test]
    fn rejects_overflowing_shapes() {
        let e = Rows::new(usize::MAX / 2, 4)
            .elements("k")
            .unwrap_err()
            .to_string();
        assert!(e.contains("overflow"), "{e}");
        let e = Rows::check("k", &[("x", 3, 4)]).unwrap_err().to_string();
        assert!(e.contains("`x`") && e.contains("needs 4"), "{e}");
    }
}
