//! model_ops.cu on every executor against the CPU model's own functions
//! (`linattn_model::cpu_ops`): LayerNorm, bias + GELU, residual add,
//! embedding + sinusoidal positions. Outputs start as NaN so an element the
//! kernel skips fails the comparison.

mod common;

use common::devices;
use linattn_kernels::ops::model_ops::{add_residual, bias_gelu, embed_positions, layer_norm, Rows};
use linattn_model::cpu_ops;
use linattn_reference::testing::{rel_l2_error, test_seed, Rng};

fn f32s(rng: &mut Rng, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    rng.uniform_vec(n, lo, hi)
        .into_iter()
        .map(|x| x as f32)
        .collect()
}

fn err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let g: Vec<f64> = got.iter().map(|&x| x as f64).collect();
    let w: Vec<f64> = want.iter().map(|&x| x as f64).collect();
    rel_l2_error(&g, &w)
}

const SHAPES: [(usize, usize); 6] = [(1, 1), (3, 17), (2, 1000), (5, 128), (300, 33), (1, 257)];

#[test]
fn layer_norm_matches_cpu_model() {
    let mut rng = Rng::new(test_seed());
    for dev in devices() {
        for (rows, cols) in SHAPES {
            // An offset mean checks the two-pass statistics.
            let x = f32s(&mut rng, rows * cols, 2.0, 6.0);
            let gain = f32s(&mut rng, cols, 0.5, 1.5);
            let bias = f32s(&mut rng, cols, -0.5, 0.5);
            let mut want = vec![0.0f32; rows * cols];
            cpu_ops::layer_norm(&x, &gain, &bias, &mut want);
            let xb = dev.upload(&x).unwrap();
            let mut yb = dev.upload(&vec![f32::NAN; rows * cols]).unwrap();
            let (gb, bb) = (dev.upload(&gain).unwrap(), dev.upload(&bias).unwrap());
            layer_norm(
                &dev,
                &xb,
                &mut yb,
                &gb,
                &bb,
                &Rows::new(rows, cols),
                cpu_ops::LN_EPS,
            )
            .unwrap();
            let got = dev.download(&yb).unwrap();
            let e = err(&got, &want);
            assert!(
                e < 1e-5,
                "{} {rows}x{cols}: rel error {e:e}",
                dev.describe()
            );
            eprintln!("layer_norm {rows}x{cols}: rel error {e:.2e}");
        }
    }
}

#[test]
fn bias_gelu_and_residual_match_cpu_model() {
    let mut rng = Rng::new(test_seed() ^ 1);
    for dev in devices() {
        for (rows, cols) in SHAPES {
            let x = f32s(&mut rng, rows * cols, -5.0, 5.0);
            let bias = f32s(&mut rng, cols, -1.0, 1.0);
            let want: Vec<f32> = x
                .iter()
                .enumerate()
                .map(|(i, &v)| cpu_ops::gelu(v + bias[i % cols]))
                .collect();
            let mut xb = dev.upload(&x).unwrap();
            let bb = dev.upload(&bias).unwrap();
            bias_gelu(&dev, &mut xb, &bb, &Rows::new(rows, cols)).unwrap();
            let e = err(&dev.download(&xb).unwrap(), &want);
            assert!(e < 1e-5, "{} gelu {rows}x{cols}: {e:e}", dev.describe());
            eprintln!("bias_gelu {rows}x{cols}: rel error {e:.2e}");

            let y = f32s(&mut rng, rows * cols, -1.0, 1.0);
            let yb = dev.upload(&y).unwrap();
            for with_bias in [false, true] {
                let mut rb = dev.upload(&x).unwrap();
                add_residual(
                    &dev,
                    &mut rb,
                    &yb,
                    with_bias.then_some(&bb),
                    &Rows::new(rows, cols),
                )
                .unwrap();
                let want: Vec<f32> = (0..rows * cols)
                    .map(|i| {
                        x[i] + if with_bias {
                            y[i] + bias[i % cols]
                        } else {
                            y[i]
                        }
                    })
                    .collect();
                let e = err(&dev.download(&rb).unwrap(), &want);
                assert!(
                    e < 1e-6,
                    "{} residual {rows}x{cols} bias {with_bias}: {e:e}",
                    dev.describe()
                );
            }
        }
    }
}

#[test]
fn embed_positions_matches_cpu_model() {
    let mut rng = Rng::new(test_seed() ^ 2);
    let vocab = 256;
    for dev in devices() {
        for (rows, cols) in [(1, 1), (3, 17), (2, 1000), (9, 128), (40, 33)] {
            for start in [0usize, 5, 300] {
                let table = f32s(&mut rng, vocab * cols, -1.0, 1.0);
                let tokens: Vec<u32> = (0..rows).map(|_| rng.range(0, vocab - 1) as u32).collect();
                let mut want = Vec::with_capacity(rows * cols);
                for (i, &t) in tokens.iter().enumerate() {
                    let mut row = table[t as usize * cols..(t as usize + 1) * cols].to_vec();
                    cpu_ops::add_position(&mut row, start + i);
                    want.extend(row);
                }
                let tb = dev.upload(&table).unwrap();
                let mut xb = dev.upload(&vec![f32::NAN; rows * cols]).unwrap();
                embed_positions(&dev, &tokens, &tb, vocab, &mut xb, cols, start).unwrap();
                let e = err(&dev.download(&xb).unwrap(), &want);
                assert!(
                    e < 1e-5,
                    "{} {rows}x{cols} start {start}: {e:e}",
                    dev.describe()
                );
                eprintln!("embed {rows}x{cols} start {start}: rel error {e:.2e}");
            }
        }
    }
}

#[test]
fn model_ops_reject_bad_arguments() {
    for dev in devices() {
        let x = dev.upload(&[0.5f32; 12]).unwrap();
        let mut y = dev.upload(&[0.0f32; 11]).unwrap();
        let g = dev.upload(&[1.0f32; 4]).unwrap();
        let e = layer_norm(&dev, &x, &mut y, &g, &g, &Rows::new(3, 4), 1e-5).unwrap_err();
        assert!(e.to_string().contains("needs 12"), "{e}");
        let mut y = dev.upload(&[0.0f32; 12]).unwrap();
        let e = layer_norm(&dev, &x, &mut y, &g, &g, &Rows::new(3, 4), f32::NAN).unwrap_err();
        assert!(e.to_string().contains("eps"), "{e}");
        let e = bias_gelu(&dev, &mut y, &g, &Rows::new(2, 6)).unwrap_err();
        assert!(e.to_string().contains("`bias`"), "{e}");
        let table = dev.upload(&[0.0f32; 8]).unwrap();
        let e = embed_positions(&dev, &[1, 4], &table, 4, &mut y, 2, 0).unwrap_err();
        assert!(e.to_string().contains("token 1 is 4"), "{e}");
        let e = embed_positions(&dev, &[1], &table, 4, &mut y, 2, 1 << 24).unwrap_err();
        assert!(e.to_string().contains("2^24"), "{e}");
        // Empty inputs are a no-op, not an error.
        embed_positions(&dev, &[], &table, 4, &mut y, 2, 0).unwrap();
    }
}
