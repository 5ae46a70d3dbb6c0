//! Property tests over random shapes and seeds (few cases, small sizes).

use crate::common::*;
use linattn_reference::testing::{rel_l2_error, Rng};
use linattn_reference::{
    causal_linear_attention, causal_linear_attention_with, linear_attention_with, FeatureMap, Form,
    Layout, LinearAttentionOptions,
};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 24,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn forms_agree(seed in any::<u64>(), n in 1usize..24, d in 1usize..7, m in 1usize..7,
                   h in 1usize..3, chunk in 1usize..10, fm in 0usize..3, normalize: bool,
                   causal: bool, with_state: bool) {
        let mut rng = Rng::new(seed);
        let fm = FeatureMap::ALL[fm];
        let orders = [Order::pick(&mut rng), Order::pick(&mut rng), Order::pick(&mut rng)];
        let p = Problem::new(&mut rng, fm, 1, h, n, d, m, orders);
        let o = LinearAttentionOptions { feature_map: fm, normalize, ..Default::default() };
        let init = with_state.then(|| p.states(&mut rng));
        let (q, k, v) = p.views();
        let f = if causal { causal_linear_attention_with::<f64> } else { linear_attention_with::<f64> };
        let a = f(Form::Quadratic, q, k, v, &o, init.as_deref()).unwrap();
        let b = f(Form::Chunked { chunk }, q, k, v, &o, init.as_deref()).unwrap();
        let c = f(Form::Recurrent, q, k, v, &o, init.as_deref()).unwrap();
        prop_assert!(rel_l2_error(b.0.data(), a.0.data()) < 1e-12);
        prop_assert!(rel_l2_error(c.0.data(), a.0.data()) < 1e-12);
        prop_assert!(rel_l2_error(&flat_states(&b.1), &flat_states(&a.1)) < 1e-12);
    }

    #[test]
    fn split_resume(seed in any::<u64>(), n in 1usize..20, split_frac in 0.0f64..=1.0) {
        let mut rng = Rng::new(seed);
        let p = Problem::new(&mut rng, FeatureMap::EluPlusOne, 1, 2, n, 3, 4, [Order::Bnhd; 3]);
        let split = ((n as f64) * split_frac) as usize;
        let o = LinearAttentionOptions::default();
        let (q, k, v) = p.views();
        let (full, fs) = causal_linear_attention(q, k, v, &o, None).unwrap();
        let (a, sa) = causal_linear_attention(cut(q, 0, split), cut(k, 0, split), cut(v, 0, split), &o, None).unwrap();
        let (b, sb) = causal_linear_attention(cut(q, split, n), cut(k, split, n), cut(v, split, n), &o, Some(&sa)).unwrap();
        for h in 0..2 {
            for t in 0..n {
                let got = if t < split { a.row(0, h, t) } else { b.row(0, h, t - split) };
                prop_assert!(rel_l2_error(got.unwrap(), full.row(0, h, t).unwrap()) < 1e-12);
            }
        }
        prop_assert!(rel_l2_error(&flat_states(&sb), &flat_states(&fs)) < 1e-12);
    }

    /// Layout validation agrees with a brute-force element-ownership check.
    #[test]
    fn overlap_check_is_exact(b in 1usize..4, h in 1usize..4, n in 1usize..5, d in 1usize..4,
                              bs in 0usize..40, hs in 0usize..12, ts in 0usize..12) {
        let l = Layout { batch: b, heads: h, tokens: n, dim: d, batch_stride: bs, head_stride: hs, token_stride: ts };
        let mut owner = vec![0u32; l.required_len().unwrap()];
        let mut overlap = false;
        for bb in 0..b { for hh in 0..h { for t in 0..n {
            for x in 0..d {
                let o = l.offset(bb, hh, t) + x;
                owner[o] += 1;
                overlap |= owner[o] > 1;
            }
        }}}
        prop_assert_eq!(l.validate().is_err(), overlap, "{:?}", l);
    }
}
