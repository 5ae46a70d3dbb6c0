//! softmax_attention.cu on every executor against `linattn_reference`:
//! causal and full prefill (`softmax_attention`) and KV-cache decode steps
//! (`KvCache`), all dtypes, head sizes 1..=256. Outputs start as NaN.

mod common;

use common::{devices, to_dtype, to_f64, tolerance};
use half::{bf16, f16};
use linattn_kernels::ops::softmax::{
    softmax_decode_step, softmax_prefill, CacheShape, SoftmaxShape,
};
use linattn_kernels::Element;
use linattn_reference::testing::{rel_l2_error, test_seed, Rng};
use linattn_reference::{softmax_attention, KvCache, Layout, View};

fn prefill_case<T: Element>(
    rng: &mut Rng,
    b: usize,
    h: usize,
    n: usize,
    d: usize,
    m: usize,
    causal: bool,
) {
    let (q, k, v) = (
        rng.uniform_vec(b * n * h * d, -1.0, 1.0),
        rng.uniform_vec(b * n * h * d, -1.0, 1.0),
        rng.uniform_vec(b * n * h * m, -1.0, 1.0),
    );
    // Round to T first so the reference sees the kernel's inputs.
    let (qt, kt, vt): (Vec<T>, Vec<T>, Vec<T>) = (to_dtype(&q), to_dtype(&k), to_dtype(&v));
    let (q, k, v) = (to_f64(&qt), to_f64(&kt), to_f64(&vt));
    let lq = Layout::bnhd(b, h, n, d);
    let lv = Layout::bnhd(b, h, n, m);
    let want = softmax_attention(
        View::new(&q, lq).unwrap(),
        View::new(&k, lq).unwrap(),
        View::new(&v, lv).unwrap(),
        causal,
        None,
    )
    .unwrap()
    .to_layout(&lv)
    .unwrap();
    for dev in devices() {
        eprint!(
            "prefill {:?} b{b} h{h} n{n} d{d} m{m} causal {causal}: ",
            T::DTYPE
        );
        let (qb, kb, vb) = (
            dev.upload(&qt).unwrap(),
            dev.upload(&kt).unwrap(),
            dev.upload(&vt).unwrap(),
        );
        let mut ob = dev.upload(&vec![T::nan(); b * n * h * m]).unwrap();
        softmax_prefill(
            &dev,
            &qb,
            &kb,
            &vb,
            &mut ob,
            &SoftmaxShape::bnhd(b, h, n, d, m),
            causal,
            None,
        )
        .unwrap();
        let got = to_f64(&dev.download(&ob).unwrap());
        let err = rel_l2_error(&got, &want);
        eprintln!("rel error {err:.2e}");
        let tol = tolerance::<T>(1e-5, 1e-2, 1e-2);
        assert!(
            err < tol,
            "{} {:?} b{b} h{h} n{n} d{d} m{m} causal {causal}: rel error {err:e}",
            dev.describe(),
            T::DTYPE
        );
    }
}

#[test]
fn prefill_matches_reference() {
    let mut rng = Rng::new(test_seed());
    for (b, h, n, d, m) in [
        (1, 1, 1, 1, 1),
        (1, 2, 7, 16, 16),
        (2, 3, 33, 17, 40),
        (1, 1, 9, 256, 256),
        (1, 2, 65, 64, 64),
    ] {
        for causal in [true, false] {
            prefill_case::<f32>(&mut rng, b, h, n, d, m, causal);
        }
    }
    prefill_case::<f16>(&mut rng, 1, 2, 20, 32, 32, true);
    prefill_case::<bf16>(&mut rng, 2, 1, 20, 48, 24, true);
}

fn decode_case<T: Element>(
    rng: &mut Rng,
    b: usize,
    h: usize,
    prompt: usize,
    steps: usize,
    d: usize,
) {
    let cap = prompt + steps;
    let total = prompt + steps;
    let all =
        |rng: &mut Rng| -> Vec<T> { to_dtype(&rng.uniform_vec(b * total * h * d, -1.0, 1.0)) };
    let (q, k, v) = (all(rng), all(rng), all(rng));
    let (qf, kf, vf) = (to_f64(&q), to_f64(&k), to_f64(&v));
    let layout = Layout::bnhd(b, h, total, d);
    let (qv, kv, vv) = (
        View::new(&qf, layout).unwrap(),
        View::new(&kf, layout).unwrap(),
        View::new(&vf, layout).unwrap(),
    );
    // Reference: a KvCache holding the prompt, then one step per token.
    let mut cache = KvCache::<f64>::new(b, h, d, d).unwrap();
    cache
        .append(
            kv.slice_tokens(0, prompt).unwrap(),
            vv.slice_tokens(0, prompt).unwrap(),
        )
        .unwrap();
    let mut wants = Vec::new();
    for t in prompt..total {
        let o = cache
            .step(
                qv.slice_tokens(t, t + 1).unwrap(),
                kv.slice_tokens(t, t + 1).unwrap(),
                vv.slice_tokens(t, t + 1).unwrap(),
                None,
            )
            .unwrap();
        wants.push(o.to_layout(&Layout::bnhd(b, h, 1, d)).unwrap());
    }
    // Token t of sequence bi, as a contiguous [heads, d] slice.
    let tok = |x: &[T], bi: usize, t: usize| -> Vec<T> {
        x[(bi * total + t) * h * d..(bi * total + t + 1) * h * d].to_vec()
    };
    let step_of = |x: &[T], t: usize| -> Vec<T> { (0..b).flat_map(|bi| tok(x, bi, t)).collect() };
    let shape = CacheShape {
        batch: b,
        heads: h,
        d,
        capacity: cap,
    };
    for dev in devices() {
        // Cache [b, cap, h, d], prompt tokens filled in, the rest NaN.
        let mut kc_host = vec![T::nan(); b * cap * h * d];
        let mut vc_host = kc_host.clone();
        for bi in 0..b {
            for t in 0..prompt {
                let at = (bi * cap + t) * h * d;
                kc_host[at..at + h * d].copy_from_slice(&tok(&k, bi, t));
                vc_host[at..at + h * d].copy_from_slice(&tok(&v, bi, t));
            }
        }
        let (mut kc, mut vc) = (dev.upload(&kc_host).unwrap(), dev.upload(&vc_host).unwrap());
        for (i, t) in (prompt..total).enumerate() {
            let (qb, kb, vb) = (
                dev.upload(&step_of(&q, t)).unwrap(),
                dev.upload(&step_of(&k, t)).unwrap(),
                dev.upload(&step_of(&v, t)).unwrap(),
            );
            let mut ob = dev.upload(&vec![T::nan(); b * h * d]).unwrap();
            softmax_decode_step(
                &dev, &qb, &kb, &vb, &mut ob, &mut kc, &mut vc, &shape, t, None,
            )
            .unwrap();
            let got = to_f64(&dev.download(&ob).unwrap());
            let err = rel_l2_error(&got, &wants[i]);
            eprintln!(
                "decode {:?} b{b} h{h} d{d} step {t}: rel error {err:.2e}",
                T::DTYPE
            );
            let tol = tolerance::<T>(1e-5, 1e-2, 1e-2);
            assert!(
                err < tol,
                "{} {:?} b{b} h{h} d{d} step {t}: rel error {err:e}",
                dev.describe(),
                T::DTYPE
            );
        }
        // The caches now hold every token.
        let kc = dev.download(&kc).unwrap();
        for bi in 0..b {
            for t in 0..total {
                let at = (bi * cap + t) * h * d;
                assert_eq!(
                    to_f64(&kc[at..at + h * d]),
                    to_f64(&tok(&k, bi, t)),
                    "{} cache token {t}",
                    dev.describe()
                );
            }
        }
    }
}

#[test]
fn decode_matches_kv_cache_reference() {
    let mut rng = Rng::new(test_seed() ^ 3);
    decode_case::<f32>(&mut rng, 1, 2, 5, 4, 16);
    decode_case::<f32>(&mut rng, 2, 3, 1, 3, 33);
    decode_case::<f32>(&mut rng, 1, 5, 0, 3, 256);
    // d = 1 with 16 heads: a single scalar output can cancel to ~0, which
    // makes a relative error meaningless; 16 of them cannot all cancel.
    decode_case::<f32>(&mut rng, 2, 8, 3, 2, 1);
    decode_case::<f16>(&mut rng, 1, 2, 4, 3, 32);
    decode_case::<bf16>(&mut rng, 1, 2, 4, 3, 32);
}

#[test]
fn softmax_ops_reject_bad_arguments() {
    for dev in devices() {
        let x = dev.upload(&[0.5f32; 32]).unwrap();
        let mut o = dev.upload(&[0.0f32; 31]).unwrap();
        let e = softmax_prefill(
            &dev,
            &x,
            &x,
            &x,
            &mut o,
            &SoftmaxShape::bnhd(1, 2, 4, 4, 4),
            true,
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("`o`"), "{e}");
        let shape = CacheShape {
            batch: 1,
            heads: 2,
            d: 4,
            capacity: 4,
        };
        let (mut kc, mut vc) = (
            dev.upload(&[0.0f32; 32]).unwrap(),
            dev.upload(&[0.0f32; 32]).unwrap(),
        );
        let mut o = dev.upload(&[0.0f32; 8]).unwrap();
        let e = softmax_decode_step(&dev, &x, &x, &x, &mut o, &mut kc, &mut vc, &shape, 4, None)
            .unwrap_err();
        assert!(e.to_string().contains("capacity"), "{e}");
        let e = softmax_decode_step(
            &dev,
            &x,
            &x,
            &x,
            &mut o,
            &mut kc,
            &mut vc,
            &shape,
            0,
            Some(f32::INFINITY),
        )
        .unwrap_err();
        assert!(e.to_string().contains("scale"), "{e}");
    }
}
