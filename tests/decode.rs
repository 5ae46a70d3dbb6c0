//! decode_step.cu on every executor: against the reference's decode step,
//! in place on the state, with strided rows, and chained after a causal
//! prefill (prefill + decode == one causal pass).

mod common;

use common::{devices, ref_opts, to_dtype, to_f64, tolerance};
use half::{bf16, f16};
use linattn_kernels::{decode_step, DecodeShape, RowStrides};
use linattn_kernels::{forward, AttentionOptions, AttentionShape, Kind, Qkv, StateIo, StateMut};
use linattn_kernels::{DType, Device, Element, FeatureMap};
use linattn_reference::testing::{rel_l2_error, test_seed, Rng};
use linattn_reference::{Layout, State, View};

fn check<T: Element>(dev: &Device, shape: &DecodeShape, opts: &AttentionOptions, rng: &mut Rng) {
    let (b, h, d, m) = (shape.batch, shape.heads, shape.d, shape.m);
    let span = |s: &RowStrides, dim: usize| (b - 1) * s.batch + (h - 1) * s.head + dim;
    let q: Vec<T> = to_dtype(&rng.normal_vec(span(&shape.q, d)));
    let k: Vec<T> = to_dtype(&rng.normal_vec(span(&shape.k, d)));
    let v: Vec<T> = to_dtype(&rng.normal_vec(span(&shape.v, m)));
    let s0: Vec<f32> = rng
        .normal_vec(b * h * d * m)
        .iter()
        .map(|&x| x as f32)
        .collect();
    let z0: Vec<f32> = rng
        .uniform_vec(b * h * d, 0.5, 4.0)
        .iter()
        .map(|&x| x as f32)
        .collect();
    let (qb, kb, vb) = (
        dev.upload(&q).unwrap(),
        dev.upload(&k).unwrap(),
        dev.upload(&v).unwrap(),
    );
    let mut o = dev.upload(&vec![T::nan(); span(&shape.o, m)]).unwrap();
    let mut sb = dev.upload(&s0).unwrap();
    let mut zb = dev.upload(&z0).unwrap();
    decode_step(
        dev,
        Qkv {
            q: &qb,
            k: &kb,
            v: &vb,
        },
        &mut o,
        &mut sb,
        &mut zb,
        shape,
        opts,
    )
    .unwrap();
    let o = to_f64(&dev.download(&o).unwrap());
    let s1 = dev.download(&sb).unwrap();
    let z1 = dev.download(&zb).unwrap();
    let (q64, k64, v64) = (to_f64(&q), to_f64(&k), to_f64(&v));
    let (mut got, mut want, mut gs, mut ws) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for bi in 0..b {
        for hi in 0..h {
            let i = bi * h + hi;
            let mut st = State {
                d,
                m,
                s: s0[i * d * m..(i + 1) * d * m]
                    .iter()
                    .map(|&x| x as f64)
                    .collect(),
                z: z0[i * d..(i + 1) * d].iter().map(|&x| x as f64).collect(),
            };
            let row = |x: &[f64], s: &RowStrides, dim: usize| {
                x[bi * s.batch + hi * s.head..][..dim].to_vec()
            };
            let r = linattn_reference::decode_step(
                &mut st,
                &row(&q64, &shape.q, d),
                &row(&k64, &shape.k, d),
                &row(&v64, &shape.v, m),
                &ref_opts(opts),
            )
            .unwrap();
            want.extend(r);
            got.extend(row(&o, &shape.o, m));
            ws.extend(st.s.iter().chain(&st.z).copied());
            gs.extend(
                s1[i * d * m..(i + 1) * d * m]
                    .iter()
                    .chain(&z1[i * d..(i + 1) * d])
                    .map(|&x| x as f64),
            );
        }
    }
    let what = format!("{} {:?} {shape:?} {opts:?}", dev.describe(), T::DTYPE);
    // Elements between the rows of a strided o are not the kernel's.
    let mut row_elems = vec![false; o.len()];
    for bi in 0..b {
        for hi in 0..h {
            let at = bi * shape.o.batch + hi * shape.o.head;
            row_elems[at..at + m].iter_mut().for_each(|x| *x = true);
        }
    }
    assert!(
        o.iter().zip(&row_elems).all(|(x, &row)| row || x.is_nan()),
        "{what}: wrote outside the output rows"
    );
    let e = rel_l2_error(&got, &want);
    let tol = tolerance::<T>(1e-5, 1e-2, 1e-2);
    assert!(e < tol, "{what}: output rel error {e:e}");
    let es = rel_l2_error(&gs, &ws);
    assert!(es < 1e-6, "{what}: state rel error {es:e}");
}

#[test]
fn decode_matches_reference() {
    let mut rng = Rng::new(test_seed());
    let strided = DecodeShape {
        q: RowStrides {
            batch: 3 * 40,
            head: 40,
        },
        k: RowStrides {
            batch: 3 * 33 + 1,
            head: 33,
        },
        v: RowStrides {
            batch: 3 * 9,
            head: 9,
        },
        o: RowStrides {
            batch: 3 * 12,
            head: 12,
        },
        ..DecodeShape::contiguous(2, 3, 33, 7)
    };
    for dev in devices() {
        let base = AttentionOptions::default();
        check::<f32>(&dev, &DecodeShape::contiguous(1, 1, 1, 1), &base, &mut rng);
        check::<f32>(
            &dev,
            &strided,
            &AttentionOptions {
                feature_map: FeatureMap::Relu,
                ..base
            },
            &mut rng,
        );
        check::<f32>(
            &dev,
            &DecodeShape::contiguous(1, 2, 256, 256),
            &base,
            &mut rng,
        );
        check::<f32>(
            &dev,
            &DecodeShape::contiguous(2, 1, 17, 200),
            &AttentionOptions {
                normalize: false,
                scale: 0.25,
                ..base
            },
            &mut rng,
        );
        check::<f16>(
            &dev,
            &DecodeShape::contiguous(3, 2, 64, 64),
            &base,
            &mut rng,
        );
        check::<bf16>(
            &dev,
            &strided,
            &AttentionOptions {
                feature_map: FeatureMap::Identity,
                normalize: false,
                ..base
            },
            &mut rng,
        );
        check::<bf16>(
            &dev,
            &DecodeShape::contiguous(1, 1, 128, 100),
            &base,
            &mut rng,
        );
        check::<f16>(
            &dev,
            &strided,
            &AttentionOptions {
                feature_map: FeatureMap::Relu,
                ..base
            },
            &mut rng,
        );
        check::<bf16>(
            &dev,
            &DecodeShape::contiguous(2, 1, 256, 256),
            &base,
            &mut rng,
        );
    }
}

/// A causal prefill of n tokens (final state out), then decode steps for
/// tokens n, n+1, ..., equals one causal pass over all of them: against the
/// f64 reference for every dtype (the 16-bit prefill runs the tensor-core
/// walk across a chunk boundary), and bit-close to the kernel's own one pass
/// for f32.
#[test]
fn prefill_then_decode_equals_one_pass() {
    let mut rng = Rng::new(test_seed());
    for dev in devices() {
        chain::<f32>(&dev, 21, AttentionOptions::default(), &mut rng);
        let relu = AttentionOptions {
            feature_map: FeatureMap::Relu,
            ..AttentionOptions::default()
        };
        chain::<bf16>(&dev, 70, relu, &mut rng);
        chain::<f16>(&dev, 70, AttentionOptions::default(), &mut rng);
    }
}

fn chain<T: Element>(dev: &Device, n: usize, opts: AttentionOptions, rng: &mut Rng) {
    let (b, h, d, m, steps) = (2, 2, 20, 12, 3);
    let what = format!("{} {:?} {opts:?}", dev.describe(), T::DTYPE);
    let total = n + steps;
    let shape = AttentionShape::bnhd(b, h, total, d, m);
    let q: Vec<T> = to_dtype(&rng.normal_vec(b * total * h * d));
    let k: Vec<T> = to_dtype(&rng.normal_vec(b * total * h * d));
    let v: Vec<T> = to_dtype(&rng.normal_vec(b * total * h * m));
    let (qb, kb, vb) = (
        dev.upload(&q).unwrap(),
        dev.upload(&k).unwrap(),
        dev.upload(&v).unwrap(),
    );
    let qkv = || Qkv {
        q: &qb,
        k: &kb,
        v: &vb,
    };
    let mut full = dev.upload(&vec![T::nan(); b * total * h * m]).unwrap();
    forward(
        Kind::Causal,
        dev,
        qkv(),
        &mut full,
        &shape,
        None,
        &opts,
        StateIo::none(),
    )
    .unwrap();
    let full = to_f64(&dev.download(&full).unwrap());
    let (q64, k64, v64) = (to_f64(&q), to_f64(&k), to_f64(&v));
    let l = |dim| Layout::bnhd(b, h, total, dim);
    let (want, _) = linattn_reference::causal_linear_attention(
        View::new(&q64, l(d)).unwrap(),
        View::new(&k64, l(d)).unwrap(),
        View::new(&v64, l(m)).unwrap(),
        &ref_opts(&opts),
        None,
    )
    .unwrap();
    let want = want.to_layout(&Layout::bnhd(b, h, total, m)).unwrap();
    // Prefill: the same buffers viewed with n tokens.
    let prefill = AttentionShape { tokens: n, ..shape };
    let mut o = dev.upload(&vec![T::nan(); b * total * h * m]).unwrap();
    let mut s = dev.upload(&vec![f32::NAN; b * h * d * m]).unwrap();
    let mut z = dev.upload(&vec![f32::NAN; b * h * d]).unwrap();
    let states = StateIo::final_only(StateMut {
        s: &mut s,
        z: &mut z,
    });
    forward(
        Kind::Causal,
        dev,
        qkv(),
        &mut o,
        &prefill,
        None,
        &opts,
        states,
    )
    .unwrap();
    for t in n..total {
        // Token t of every (batch, head): rows of the [B, N, H, dim] buffers.
        fn pick<X: Copy>(x: &[X], b: usize, total: usize, t: usize, hd: usize) -> Vec<X> {
            (0..b)
                .flat_map(|bi| x[(bi * total + t) * hd..][..hd].to_vec())
                .collect()
        }
        let ds = DecodeShape::contiguous(b, h, d, m);
        let (qt, kt, vt) = (
            dev.upload(&pick(&q, b, total, t, h * d)).unwrap(),
            dev.upload(&pick(&k, b, total, t, h * d)).unwrap(),
            dev.upload(&pick(&v, b, total, t, h * m)).unwrap(),
        );
        let mut ot = dev.upload(&vec![T::nan(); b * h * m]).unwrap();
        let step = Qkv {
            q: &qt,
            k: &kt,
            v: &vt,
        };
        decode_step(dev, step, &mut ot, &mut s, &mut z, &ds, &opts).unwrap();
        let got = to_f64(&dev.download(&ot).unwrap());
        let e = rel_l2_error(&got, &pick(&want, b, total, t, h * m));
        let tol = tolerance::<T>(1e-5, 1e-2, 1e-2);
        assert!(e < tol, "{what}: decode step {t} vs the reference: {e:e}");
        if T::DTYPE == DType::F32 {
            let e = rel_l2_error(&got, &pick(&full, b, total, t, h * m));
            assert!(e < 1e-6, "{what}: decode step {t} vs one pass: {e:e}");
        }
    }
}
