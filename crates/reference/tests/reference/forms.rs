//! The three forms agree; split-and-resume, decode, causality, varlen, f32.

use crate::common::*;
use linattn_reference::testing::{rel_l2_error, test_seed, Rng};
use linattn_reference::{
    causal_linear_attention, causal_linear_attention_with, decode, decode_step, linear_attention,
    linear_attention_with, varlen_causal_linear_attention, varlen_linear_attention, FeatureMap,
    Form, Layout, LinearAttentionOptions, Real, State, Tensor, View,
};

type Out = (Tensor<f64>, Vec<State<f64>>);

fn run(
    form: Form,
    causal: bool,
    p: &Problem,
    o: &LinearAttentionOptions,
    init: Option<&[State<f64>]>,
) -> Out {
    let (q, k, v) = p.views();
    if causal {
        causal_linear_attention_with(form, q, k, v, o, init).unwrap()
    } else {
        linear_attention_with(form, q, k, v, o, init).unwrap()
    }
}

fn assert_close(a: &Out, b: &Out, tol: f64, what: &str) {
    let e = rel_l2_error(a.0.data(), b.0.data());
    assert!(e <= tol, "{what}: output rel error {e:e}");
    let e = rel_l2_error(&flat_states(&a.1), &flat_states(&b.1));
    assert!(e <= tol, "{what}: state rel error {e:e}");
}

#[test]
fn three_forms_agree_on_random_problems() {
    let mut rng = Rng::new(test_seed());
    for case in 0..60 {
        let fm = FeatureMap::ALL[case % 3];
        let p = Problem::random(&mut rng, fm);
        let o = random_opts(&mut rng, fm);
        let init = rng.bool().then(|| p.states(&mut rng));
        let chunk = rng.range(1, p.n + 3);
        for causal in [true, false] {
            let what = format!(
                "case {case} causal={causal} {o:?} chunk={chunk} init={} {:?}",
                init.is_some(),
                (p.b, p.h, p.n, p.d, p.m, p.lq, p.lv)
            );
            let quad = run(Form::Quadratic, causal, &p, &o, init.as_deref());
            let rec = run(Form::Recurrent, causal, &p, &o, init.as_deref());
            let chk = run(Form::Chunked { chunk }, causal, &p, &o, init.as_deref());
            assert!(quad.0.data().iter().all(|x| x.is_finite()), "{what}");
            assert_close(
                &rec,
                &quad,
                1e-12,
                &format!("recurrent vs quadratic, {what}"),
            );
            assert_close(&chk, &quad, 1e-12, &format!("chunked vs quadratic, {what}"));
        }
    }
}

#[test]
fn forms_agree_on_edge_shapes() {
    let mut rng = Rng::new(test_seed());
    // (n, d, m, chunk): N = 1, D = 1, D != M, N not a multiple of the chunk,
    // chunk larger than N, chunk 1.
    let shapes = [
        (1, 1, 1, 64),
        (1, 5, 3, 1),
        (7, 1, 4, 3),
        (13, 6, 2, 4),
        (64, 3, 5, 64),
        (65, 4, 4, 16),
        (9, 2, 7, 1),
    ];
    for &(n, d, m, chunk) in &shapes {
        for fm in FeatureMap::ALL {
            for normalize in [true, false] {
                let orders = [Order::Bnhd, Order::Bhnd, Order::Padded];
                let p = Problem::new(&mut rng, fm, 1, 2, n, d, m, orders);
                let o = LinearAttentionOptions {
                    feature_map: fm,
                    normalize,
                    ..Default::default()
                };
                let init = p.states(&mut rng);
                for causal in [true, false] {
                    for init in [None, Some(&init[..])] {
                        let quad = run(Form::Quadratic, causal, &p, &o, init);
                        let rec = run(Form::Recurrent, causal, &p, &o, init);
                        let chk = run(Form::Chunked { chunk }, causal, &p, &o, init);
                        let what = format!("n={n} d={d} m={m} chunk={chunk} {fm:?} normalize={normalize} causal={causal}");
                        assert_close(&rec, &quad, 1e-12, &what);
                        assert_close(&chk, &quad, 1e-12, &what);
                    }
                }
            }
        }
    }
}

#[test]
fn default_entry_points_are_the_recurrent_form() {
    let mut rng = Rng::new(test_seed());
    let p = Problem::random(&mut rng, FeatureMap::EluPlusOne);
    let o = LinearAttentionOptions::default();
    let (q, k, v) = p.views();
    assert_eq!(
        causal_linear_attention(q, k, v, &o, None).unwrap(),
        run(Form::Recurrent, true, &p, &o, None)
    );
    assert_eq!(
        linear_attention(q, k, v, &o, None).unwrap(),
        run(Form::Recurrent, false, &p, &o, None)
    );
    // The output layout is the documented contiguous [B, H, N, M].
    let out = causal_linear_attention(q, k, v, &o, None).unwrap().0;
    assert_eq!(*out.layout(), Layout::bhnd(p.b, p.h, p.n, p.m));
}

#[test]
fn single_token_matches_hand_computation() {
    // d = m = 1, q = k = 0 so phi = 1 under elu+1: o = s v / (s + eps).
    let o = LinearAttentionOptions {
        scale: 0.5,
        eps: 0.25,
        ..Default::default()
    };
    let l = Layout::bhnd(1, 1, 1, 1);
    let (q, k, v) = ([0.0], [0.0], [3.0]);
    let (out, st) = causal_linear_attention(
        View::new(&q, l).unwrap(),
        View::new(&k, l).unwrap(),
        View::new(&v, l).unwrap(),
        &o,
        None,
    )
    .unwrap();
    assert!((out.data()[0] - 0.5f64 * 3.0 / (0.5 + 0.25)).abs() < 1e-15);
    assert_eq!((st[0].s[0], st[0].z[0]), (3.0, 1.0));
    // Two tokens, non-causal, no normalisation, identity map: o_i = s q_i (k.v summed).
    let l = Layout::bhnd(1, 1, 2, 1);
    let (q, k, v) = ([1.0, 2.0], [3.0, 4.0], [5.0, 6.0]);
    let o = LinearAttentionOptions {
        feature_map: FeatureMap::Identity,
        normalize: false,
        scale: 2.0,
        ..Default::default()
    };
    let (out, _) = linear_attention(
        View::new(&q, l).unwrap(),
        View::new(&k, l).unwrap(),
        View::new(&v, l).unwrap(),
        &o,
        None,
    )
    .unwrap();
    assert_eq!(out.data(), &[2.0 * 39.0, 4.0 * 39.0]);
}

#[test]
fn split_and_resume_equals_one_pass() {
    let mut rng = Rng::new(test_seed());
    for _ in 0..6 {
        let fm = FeatureMap::ALL[rng.range(0, 2)];
        let p = Problem::random(&mut rng, fm);
        let o = random_opts(&mut rng, fm);
        let init = rng.bool().then(|| p.states(&mut rng));
        let (q, k, v) = p.views();
        let (full, full_st) = causal_linear_attention(q, k, v, &o, init.as_deref()).unwrap();
        let (_, nc_st) = linear_attention(q, k, v, &o, init.as_deref()).unwrap();
        for split in 0..=p.n {
            let part = |t0, t1, st: Option<&[State<f64>]>| {
                causal_linear_attention(cut(q, t0, t1), cut(k, t0, t1), cut(v, t0, t1), &o, st)
                    .unwrap()
            };
            let (a, st_a) = part(0, split, init.as_deref());
            let (b, st_b) = part(split, p.n, Some(&st_a));
            for bb in 0..p.b {
                for h in 0..p.h {
                    for t in 0..p.n {
                        let got = if t < split {
                            a.row(bb, h, t)
                        } else {
                            b.row(bb, h, t - split)
                        };
                        let e = rel_l2_error(got.unwrap(), full.row(bb, h, t).unwrap());
                        assert!(e < 1e-12, "split {split} token {t}: {e:e}");
                    }
                }
            }
            assert!(rel_l2_error(&flat_states(&st_b), &flat_states(&full_st)) < 1e-12);
            // The final state does not depend on causality.
            assert!(rel_l2_error(&flat_states(&st_b), &flat_states(&nc_st)) < 1e-12);
        }
    }
}

#[test]
fn decode_after_prefill_equals_causal() {
    let mut rng = Rng::new(test_seed());
    for fm in FeatureMap::ALL {
        let orders = [Order::Bnhd, Order::Padded, Order::Bhnd];
        let (b, h, n, d, m) = (2, 2, 11, 5, 3);
        let p = Problem::new(&mut rng, fm, b, h, n, d, m, orders);
        let o = random_opts(&mut rng, fm);
        let (q, k, v) = p.views();
        let (full, full_st) = causal_linear_attention(q, k, v, &o, None).unwrap();
        let prefill = rng.range(0, n - 1);
        let (_, mut states) = causal_linear_attention(
            cut(q, 0, prefill),
            cut(k, 0, prefill),
            cut(v, 0, prefill),
            &o,
            None,
        )
        .unwrap();
        let mut batched = states.clone();
        for t in prefill..n {
            // Batched in-place decode of one token for every head...
            let out = decode(
                &mut batched,
                cut(q, t, t + 1),
                cut(k, t, t + 1),
                cut(v, t, t + 1),
                &o,
            )
            .unwrap();
            for bb in 0..b {
                for hh in 0..h {
                    // ...and the single-head step.
                    let row = |x: &View<'_, f64>| x.row(bb, hh, t).unwrap().to_vec();
                    let got =
                        decode_step(&mut states[bb * h + hh], &row(&q), &row(&k), &row(&v), &o)
                            .unwrap();
                    let want = full.row(bb, hh, t).unwrap();
                    assert!(rel_l2_error(&got, want) < 1e-12, "{fm:?} token {t}");
                    assert!(rel_l2_error(out.row(bb, hh, 0).unwrap(), want) < 1e-12);
                }
            }
        }
        assert!(rel_l2_error(&flat_states(&states), &flat_states(&full_st)) < 1e-12);
        assert!(rel_l2_error(&flat_states(&batched), &flat_states(&full_st)) < 1e-12);
    }
}

#[test]
fn causal_linear_outputs_ignore_future_tokens() {
    let mut rng = Rng::new(test_seed());
    for fm in FeatureMap::ALL {
        let p = Problem::new(&mut rng, fm, 1, 2, 9, 3, 4, [Order::Bnhd; 3]);
        let o = LinearAttentionOptions {
            feature_map: fm,
            ..Default::default()
        };
        for form in [Form::Quadratic, Form::Recurrent, Form::Chunked { chunk: 4 }] {
            let base = run(form, true, &p, &o, None).0;
            let j = rng.range(1, p.n - 1);
            let mut pert = p.clone();
            // Make q_j, k_j positive (so relu cannot hide them) and move v_j.
            for (buf, l) in [
                (&mut pert.q, p.lq),
                (&mut pert.k, p.lk),
                (&mut pert.v, p.lv),
            ] {
                for h in 0..p.h {
                    let o = l.offset(0, h, j);
                    buf[o] = buf[o].abs() + 1.0;
                }
            }
            let moved = run(form, true, &pert, &o, None).0;
            for h in 0..p.h {
                for t in 0..j {
                    assert_eq!(
                        base.row(0, h, t),
                        moved.row(0, h, t),
                        "{form:?} {fm:?}: token {t} saw token {j}"
                    );
                }
                assert_ne!(
                    base.row(0, h, j),
                    moved.row(0, h, j),
                    "{form:?} {fm:?}: token {j} ignored itself"
                );
            }
        }
    }
}

#[test]
fn varlen_equals_each_sequence_separately() {
    let mut rng = Rng::new(test_seed());
    for case in 0..6 {
        let fm = FeatureMap::ALL[case % 3];
        let (h, d, m) = (rng.range(1, 3), rng.range(1, 6), rng.range(1, 6));
        let nseq = rng.range(1, 4);
        let mut cu = vec![0];
        for _ in 0..nseq {
            // Some empty sequences on purpose.
            let len = if rng.range(0, 4) == 0 {
                0
            } else {
                rng.range(1, 12)
            };
            cu.push(cu.last().unwrap() + len);
        }
        let total = *cu.last().unwrap();
        let order = if rng.bool() {
            Order::Bnhd
        } else {
            Order::Padded
        };
        let p = Problem::new(&mut rng, fm, 1, h, total, d, m, [order; 3]);
        let o = random_opts(&mut rng, fm);
        let init = random_states(&mut rng, nseq * h, d, m);
        let (q, k, v) = p.views();
        for causal in [true, false] {
            let (out, st) = if causal {
                varlen_causal_linear_attention(q, k, v, &cu, &o, Some(&init)).unwrap()
            } else {
                varlen_linear_attention(q, k, v, &cu, &o, Some(&init)).unwrap()
            };
            assert_eq!(*out.layout(), Layout::packed(total, h, m));
            for s in 0..nseq {
                let (t0, t1) = (cu[s], cu[s + 1]);
                let init_s = &init[s * h..(s + 1) * h];
                let (want, want_st) = if causal {
                    causal_linear_attention(
                        cut(q, t0, t1),
                        cut(k, t0, t1),
                        cut(v, t0, t1),
                        &o,
                        Some(init_s),
                    )
                    .unwrap()
                } else {
                    linear_attention(
                        cut(q, t0, t1),
                        cut(k, t0, t1),
                        cut(v, t0, t1),
                        &o,
                        Some(init_s),
                    )
                    .unwrap()
                };
                for hh in 0..h {
                    for t in t0..t1 {
                        let e = rel_l2_error(
                            out.row(0, hh, t).unwrap(),
                            want.row(0, hh, t - t0).unwrap(),
                        );
                        assert!(e < 1e-12, "seq {s} head {hh} token {t}: {e:e}");
                    }
                }
                assert!(
                    rel_l2_error(
                        &flat_states(&st[s * h..(s + 1) * h]),
                        &flat_states(&want_st)
                    ) < 1e-12
                );
            }
        }
    }
}

fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

#[test]
fn f32_agrees_with_f64() {
    let mut rng = Rng::new(test_seed());
    for case in 0..12 {
        let fm = FeatureMap::ALL[case % 3];
        let p = Problem::random(&mut rng, fm);
        let o = LinearAttentionOptions {
            feature_map: fm,
            normalize: case % 2 == 0,
            ..Default::default()
        };
        let (q32, k32, v32) = (to_f32(&p.q), to_f32(&p.k), to_f32(&p.v));
        let (q, k, v) = (
            View::new(&q32, p.lq).unwrap(),
            View::new(&k32, p.lk).unwrap(),
            View::new(&v32, p.lv).unwrap(),
        );
        for form in [Form::Quadratic, Form::Recurrent, Form::Chunked { chunk: 5 }] {
            for causal in [true, false] {
                let want = run(form, causal, &p, &o, None);
                let got = if causal {
                    causal_linear_attention_with(form, q, k, v, &o, None).unwrap()
                } else {
                    linear_attention_with(form, q, k, v, &o, None).unwrap()
                };
                let got64: Vec<f64> = got.0.data().iter().map(|x| x.to_f64()).collect();
                let e = rel_l2_error(&got64, want.0.data());
                assert!(e < 1e-5, "case {case} {form:?} causal={causal}: {e:e}");
                let st64: Vec<State<f64>> = got.1.iter().map(|s| s.cast()).collect();
                assert!(rel_l2_error(&flat_states(&st64), &flat_states(&want.1)) < 1e-5);
            }
        }
    }
}

#[test]
fn half_inputs_convert_on_load() {
    use linattn_reference::{from_f64_slice, to_f64_vec};
    let mut rng = Rng::new(test_seed());
    let x = rng.normal_vec(32);
    let h: Vec<half::f16> = from_f64_slice(&x);
    let b: Vec<half::bf16> = from_f64_slice(&x);
    assert!(rel_l2_error(&to_f64_vec(&h), &x) < 1e-3);
    assert!(rel_l2_error(&to_f64_vec(&b), &x) < 1e-2);
    // Exact widening: rounding twice changes nothing.
    assert_eq!(
        to_f64_vec(&from_f64_slice::<half::f16>(&to_f64_vec(&h))),
        to_f64_vec(&h)
    );
}

#[test]
fn to_layout_round_trips() {
    let mut rng = Rng::new(test_seed());
    let p = Problem::random(&mut rng, FeatureMap::EluPlusOne);
    let (q, k, v) = p.views();
    let (out, _) =
        causal_linear_attention(q, k, v, &LinearAttentionOptions::default(), None).unwrap();
    let l = Order::Padded.layout(p.b, p.h, p.n, p.m);
    let strided = out.to_layout(&l).unwrap();
    let back = View::new(&strided, l).unwrap();
    for b in 0..p.b {
        for h in 0..p.h {
            for t in 0..p.n {
                assert_eq!(back.row(b, h, t), out.row(b, h, t));
            }
        }
    }
}
