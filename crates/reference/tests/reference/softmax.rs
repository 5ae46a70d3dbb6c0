//! Softmax attention: probabilities, causality, KV-cache decode.

use crate::common::*;
use linattn_reference::testing::{rel_l2_error, test_seed, Rng};
use linattn_reference::{
    softmax_attention, softmax_probabilities, FeatureMap, KvCache, Layout, View,
};

#[test]
fn rows_sum_to_one_and_match_one_hot_values() {
    let mut rng = Rng::new(test_seed());
    for causal in [true, false] {
        let n = 7;
        let p = Problem::new(
            &mut rng,
            FeatureMap::Identity,
            2,
            2,
            n,
            5,
            1,
            [Order::Bnhd, Order::Padded, Order::Bhnd],
        );
        let (q, k, _) = p.views();
        let probs = softmax_probabilities(q, k, causal, None).unwrap();
        // V = one-hot columns (identity): the output row is the probability row.
        let mut eye = vec![0.0; 2 * 2 * n * n];
        let le = Layout::bhnd(2, 2, n, n);
        for b in 0..2 {
            for h in 0..2 {
                for t in 0..n {
                    eye[le.offset(b, h, t) + t] = 1.0;
                }
            }
        }
        let out = softmax_attention(q, k, View::new(&eye, le).unwrap(), causal, None).unwrap();
        for b in 0..2 {
            for h in 0..2 {
                for i in 0..n {
                    let row = probs.row(b, h, i).unwrap();
                    let total: f64 = row.iter().sum();
                    assert!((total - 1.0).abs() < 1e-14, "row sum {total}");
                    assert!(row.iter().all(|&x| x >= 0.0));
                    if causal {
                        assert!(
                            row[i + 1..].iter().all(|&x| x == 0.0),
                            "masked weights must be 0"
                        );
                    }
                    assert!(rel_l2_error(out.row(b, h, i).unwrap(), row) < 1e-14);
                }
            }
        }
    }
}

#[test]
fn default_scale_is_inverse_sqrt_d_and_uniform_query_averages() {
    let mut rng = Rng::new(test_seed());
    let p = Problem::new(
        &mut rng,
        FeatureMap::Identity,
        1,
        1,
        6,
        4,
        3,
        [Order::Bhnd; 3],
    );
    let (q, k, v) = p.views();
    let a = softmax_attention(q, k, v, true, None).unwrap();
    let b = softmax_attention(q, k, v, true, Some(0.5)).unwrap();
    assert_eq!(a, b);
    // Scale 0: uniform weights, the output is the running mean of v.
    let c = softmax_attention(q, k, v, true, Some(0.0)).unwrap();
    for i in 0..6 {
        for x in 0..3 {
            let mean = (0..=i).map(|j| v.row(0, 0, j).unwrap()[x]).sum::<f64>() / (i + 1) as f64;
            assert!((c.row(0, 0, i).unwrap()[x] - mean).abs() < 1e-14);
        }
    }
}

#[test]
fn causal_softmax_ignores_future_tokens() {
    let mut rng = Rng::new(test_seed());
    let p = Problem::new(
        &mut rng,
        FeatureMap::EluPlusOne,
        1,
        2,
        8,
        3,
        4,
        [Order::Bnhd; 3],
    );
    let j = rng.range(1, 6);
    let mut pert = p.clone();
    for (buf, l) in [
        (&mut pert.q, p.lq),
        (&mut pert.k, p.lk),
        (&mut pert.v, p.lv),
    ] {
        for h in 0..2 {
            buf[l.offset(0, h, j)] -= 0.75;
        }
    }
    let (q, k, v) = p.views();
    let (q2, k2, v2) = pert.views();
    let base = softmax_attention(q, k, v, true, None).unwrap();
    let moved = softmax_attention(q2, k2, v2, true, None).unwrap();
    for h in 0..2 {
        for t in 0..j {
            assert_eq!(
                base.row(0, h, t),
                moved.row(0, h, t),
                "token {t} saw token {j}"
            );
        }
        assert_ne!(base.row(0, h, j), moved.row(0, h, j));
    }
    // Non-causal attention does see the future (the test above can fail).
    let nc = softmax_attention(q, k, v, false, None).unwrap();
    let nc2 = softmax_attention(q2, k2, v2, false, None).unwrap();
    assert_ne!(nc.row(0, 0, 0), nc2.row(0, 0, 0));
}

#[test]
fn kv_cache_decode_equals_causal_softmax() {
    let mut rng = Rng::new(test_seed());
    let (b, h, n, d, m) = (2, 3, 10, 4, 5);
    let p = Problem::new(
        &mut rng,
        FeatureMap::EluPlusOne,
        b,
        h,
        n,
        d,
        m,
        [Order::Bnhd, Order::Bhnd, Order::Padded],
    );
    let (q, k, v) = p.views();
    let want = softmax_attention(q, k, v, true, None).unwrap();
    let mut cache = KvCache::new(b, h, d, m).unwrap();
    assert!(cache.is_empty());
    let prefill = 4;
    let pre = cache
        .step(
            cut(q, 0, prefill),
            cut(k, 0, prefill),
            cut(v, 0, prefill),
            None,
        )
        .unwrap();
    for t in prefill..n {
        let o = cache
            .step(cut(q, t, t + 1), cut(k, t, t + 1), cut(v, t, t + 1), None)
            .unwrap();
        for bb in 0..b {
            for hh in 0..h {
                assert!(
                    rel_l2_error(o.row(bb, hh, 0).unwrap(), want.row(bb, hh, t).unwrap()) < 1e-13
                );
                if t == prefill {
                    for tp in 0..prefill {
                        assert!(
                            rel_l2_error(
                                pre.row(bb, hh, tp).unwrap(),
                                want.row(bb, hh, tp).unwrap()
                            ) < 1e-13
                        );
                    }
                }
            }
        }
    }
    assert_eq!(cache.len(), n);
}
