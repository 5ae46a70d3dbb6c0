//! CPU building blocks in f32: projections, LayerNorm, GELU, positions.
//!
//! Projections of several rows (prefill) go through `matrixmultiply::sgemm`;
//! a single row (decode) is a matrix-vector product written as plain dot
//! products over the weight rows, which avoids the GEMM's packing copy of the
//! whole weight matrix for one row.

/// Dot product with eight independent accumulators so the compiler can
/// vectorise it (f32 addition is not associative, so it will not reorder a
/// single accumulator by itself).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    let s0 = (acc[0] + acc[4]) + (acc[1] + acc[5]);
    let s1 = (acc[2] + acc[6]) + (acc[3] + acc[7]);
    (s0 + s1) + tail
}

/// A dense layer `y = x W^T (+ b)`, with `W` stored `[out, in]` row-major (the
/// PyTorch `nn.Linear` convention, so such weights load unchanged).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Linear {
    pub w: Vec<f32>,
    pub b: Option<Vec<f32>>,
    pub d_in: usize,
    pub d_out: usize,
}

impl Linear {
    /// `out[n, d_out] = x[n, d_in] W^T + b`. Lengths are the caller's
    /// invariant (the model sizes every buffer from its config).
    pub fn forward(&self, x: &[f32], n: usize, out: &mut [f32]) {
        project(&self.w, self.d_in, self.d_out, x, n, out);
        if let Some(b) = &self.b {
            let m = self.d_out;
            for row in out[..n * m].chunks_exact_mut(m) {
                for (y, &bi) in row.iter_mut().zip(b) {
                    *y += bi;
                }
            }
        }
    }
}

/// `out[n, d_out] = x[n, d_in] W^T` (no bias) with `W` stored `[d_out,
/// d_in]`: the GEMM for several rows, dot products for one. Shared by
/// [`Linear::forward`] and the emulator-backed device path, so both compute
/// the projections bit for bit alike.
pub(crate) fn project(w: &[f32], k: usize, m: usize, x: &[f32], n: usize, out: &mut [f32]) {
    assert!(x.len() >= n * k && out.len() >= n * m && w.len() == m * k);
    if n == 1 {
        for (o, row) in out[..m].iter_mut().zip(w.chunks_exact(k)) {
            *o = dot(&x[..k], row);
        }
    } else if n > 1 {
        // SAFETY: x is n x k with row stride k, W^T is read as k x m
        // through W's [m, k] storage (row stride 1, column stride k), out
        // is n x m with row stride m; the assert above proves every index
        // in range, and out does not alias x or W.
        unsafe {
            matrixmultiply::sgemm(
                n,
                k,
                m,
                1.0,
                x.as_ptr(),
                k as isize,
                1,
                w.as_ptr(),
                1,
                k as isize,
                0.0,
                out.as_mut_ptr(),
                m as isize,
                1,
            );
        }
    }
}

/// LayerNorm over the last dimension with a gain and a bias.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LayerNorm {
    pub gain: Vec<f32>,
    pub bias: Vec<f32>,
}

/// LayerNorm epsilon (PyTorch's default).
pub(crate) const LN_EPS: f32 = 1e-5;

impl LayerNorm {
    /// Normalises each row of `x` (rows of `gain.len()`) into `out`.
    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        let d = self.gain.len();
        for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let mean = xr.iter().sum::<f32>() / d as f32;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let inv = 1.0 / (var + LN_EPS).sqrt();
            for (((o, &v), &g), &b) in or.iter_mut().zip(xr).zip(&self.gain).zip(&self.bias) {
                *o = (v - mean) * inv * g + b;
            }
        }
    }
}

/// GELU, tanh approximation: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
#[inline]
pub(crate) fn gelu(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    0.5 * x * (1.0 + (C * (x + 0.044_715 * x * x * x)).tanh())
}

/// Adds the sinusoidal encoding of position `pos` to `row` (length d):
/// `pe[2i] = sin(pos / 10000^(2i/d))`, `pe[2i+1] = cos(same)`; computed in
/// f64 so far positions keep their precision.
pub(crate) fn add_position(row: &mut [f32], pos: usize) {
    let d = row.len();
    for (i, pair) in row.chunks_mut(2).enumerate() {
        let freq = (10000f64).powf(-((2 * i) as f64) / d as f64);
        let angle = pos as f64 * freq;
        pair[0] += angle.sin() as f32;
        if let Some(c) = pair.get_mut(1) {
            *c += angle.cos() as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive_for_odd_lengths() {
        for n in [0usize, 1, 7, 8, 9, 31] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - naive).abs() < 1e-5, "n = {n}");
        }
    }

    #[test]
    fn gemm_and_matvec_paths_agree_with_naive() {
        let (n, k, m) = (5, 13, 7);
        let lin = Linear {
            w: (0..m * k)
                .map(|i| ((i * 7 % 11) as f32 - 5.0) / 7.0)
                .collect(),
            b: Some((0..m).map(|i| i as f32 * 0.1).collect()),
            d_in: k,
            d_out: m,
        };
        let x: Vec<f32> = (0..n * k)
            .map(|i| ((i * 5 % 9) as f32 - 4.0) / 3.0)
            .collect();
        let mut out = vec![f32::NAN; n * m];
        lin.forward(&x, n, &mut out);
        for r in 0..n {
            let mut one = vec![f32::NAN; m];
            lin.forward(&x[r * k..(r + 1) * k], 1, &mut one);
            for j in 0..m {
                let naive: f32 = (0..k).map(|c| x[r * k + c] * lin.w[j * k + c]).sum::<f32>()
                    + lin.b.as_ref().unwrap()[j];
                assert!((out[r * m + j] - naive).abs() < 1e-4, "gemm ({r}, {j})");
                assert!((one[j] - naive).abs() < 1e-4, "matvec ({r}, {j})");
            }
        }
    }

    #[test]
    fn layernorm_normalises() {
        let ln = LayerNorm {
            gain: vec![1.0; 6],
            bias: vec![0.0; 6],
        };
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 9.0];
        let mut y = [0.0; 6];
        ln.forward(&x, &mut y);
        let mean: f32 = y.iter().sum::<f32>() / 6.0;
        let var: f32 = y.iter().map(|v| v * v).sum::<f32>() / 6.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-4);
    }

    #[test]
    fn gelu_reference_points() {
        assert_eq!(gelu(0.0), 0.0);
        assert!((gelu(1.0) - 0.841_192).abs() < 1e-5);
        assert!((gelu(-1.0) + 0.158_808).abs() < 1e-5);
        assert!(gelu(-20.0).abs() < 1e-6 && (gelu(20.0) - 20.0).abs() < 1e-5);
    }

    #[test]
    fn positions_are_sin_cos() {
        let mut row = vec![0.0f32; 5];
        add_position(&mut row, 3);
        assert!((row[0] - 3f32.sin()).abs() < 1e-6 && (row[1] - 3f32.cos()).abs() < 1e-6);
        let f = 10000f64.powf(-2.0 / 5.0);
        assert!((row[2] as f64 - (3.0 * f).sin()).abs() < 1e-6);
        assert!((row[4] as f64 - (3.0 * 10000f64.powf(-4.0 / 5.0)).sin()).abs() < 1e-6);
    }
}
