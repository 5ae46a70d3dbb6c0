//! feature_map.cu on every executor against the reference's phi, all dtypes.

mod common;

use common::{devices, ref_map, to_dtype, to_f64, tolerance};
use half::{bf16, f16};
use linattn_kernels::{feature_map, RowsShape};
use linattn_kernels::{Element, FeatureMap};
use linattn_reference::testing::{rel_l2_error, test_seed, Rng};

fn maps() -> [(FeatureMap, linattn_reference::FeatureMap); 3] {
    [
        FeatureMap::EluPlusOne,
        FeatureMap::Relu,
        FeatureMap::Identity,
    ]
    .map(|m| (m, ref_map(m)))
}

fn check<T: Element>(rng: &mut Rng) {
    let shapes = [
        RowsShape::contiguous(1, 1),
        RowsShape::contiguous(3, 17),
        RowsShape::contiguous(2, 1025),
        RowsShape {
            rows: 5,
            cols: 64,
            x_row_stride: 96,
            y_row_stride: 70,
        },
        RowsShape {
            rows: 7,
            cols: 3,
            x_row_stride: 3,
            y_row_stride: 8,
        },
    ];
    for dev in devices() {
        for shape in &shapes {
            for (map, ref_map) in maps() {
                let x_len = (shape.rows - 1) * shape.x_row_stride + shape.cols;
                let y_len = (shape.rows - 1) * shape.y_row_stride + shape.cols;
                let x_host: Vec<T> = to_dtype(&rng.uniform_vec(x_len, -3.0, 3.0));
                let x = dev.upload(&x_host).unwrap();
                let mut y = dev.upload(&vec![T::nan(); y_len]).unwrap();
                feature_map(&dev, &x, &mut y, shape, map).unwrap();
                let y = to_f64(&dev.download(&y).unwrap());
                let (mut got, mut want) = (Vec::new(), Vec::new());
                for r in 0..shape.rows {
                    for c in 0..shape.cols {
                        got.push(y[r * shape.y_row_stride + c]);
                        want.push(ref_map.apply(x_host[r * shape.x_row_stride + c].to_f64()));
                    }
                    // The gaps between output rows must stay untouched.
                    if r + 1 < shape.rows {
                        for c in shape.cols..shape.y_row_stride {
                            assert!(
                                y[r * shape.y_row_stride + c].is_nan(),
                                "{}: wrote outside the view",
                                dev.describe()
                            );
                        }
                    }
                }
                let err = rel_l2_error(&got, &want);
                let tol = tolerance::<T>(1e-6, 1e-3, 8e-3);
                assert!(
                    err < tol,
                    "{} {:?} {map:?} {shape:?}: rel error {err:e} >= {tol:e}",
                    dev.describe(),
                    T::DTYPE
                );
            }
        }
    }
}

#[test]
fn feature_map_matches_reference_all_dtypes() {
    let mut rng = Rng::new(test_seed());
    check::<f32>(&mut rng);
    check::<f16>(&mut rng);
    check::<bf16>(&mut rng);
}

#[test]
fn feature_map_rejects_bad_shapes() {
    for dev in devices() {
        let x = dev.upload(&[0.5f32; 10]).unwrap();
        let mut y = dev.upload(&[0.0f32; 10]).unwrap();
        let e = feature_map(
            &dev,
            &x,
            &mut y,
            &RowsShape::contiguous(3, 4),
            FeatureMap::Relu,
        )
        .unwrap_err();
        assert!(e.to_string().contains("needs 12"), "{e}");
    }
}
