//! Backward passes against central finite differences, in f64.

use crate::common::*;
use linattn_reference::testing::{rel_l2_error, test_seed, Rng};
use linattn_reference::{
    causal_linear_attention, causal_linear_attention_backward, linear_attention,
    linear_attention_backward, varlen_causal_linear_attention_backward, FeatureMap, Gradients,
    LinearAttentionOptions, State, View,
};

/// Loss `L = <G, O> + <GS, S_N> + <Gz, z_N>` and its parameters.
struct Setup {
    p: Problem,
    g: Vec<f64>,
    init: Vec<State<f64>>,
    d_final: Vec<State<f64>>,
    opts: LinearAttentionOptions,
    causal: bool,
}

impl Setup {
    fn loss(&self, p: &Problem, init: &[State<f64>]) -> f64 {
        let (q, k, v) = p.views();
        let f = if self.causal {
            causal_linear_attention
        } else {
            linear_attention
        };
        let (out, fin) = f(q, k, v, &self.opts, Some(init)).unwrap();
        let mut l: f64 = out.data().iter().zip(&self.g).map(|(a, b)| a * b).sum();
        for (s, gs) in fin.iter().zip(&self.d_final) {
            l += s.s.iter().zip(&gs.s).map(|(a, b)| a * b).sum::<f64>();
            l += s.z.iter().zip(&gs.z).map(|(a, b)| a * b).sum::<f64>();
        }
        l
    }

    fn grads(&self) -> Gradients<f64> {
        let (q, k, v) = self.p.views();
        let lg = linattn_reference::Layout::bhnd(self.p.b, self.p.h, self.p.n, self.p.m);
        let g = View::new(&self.g, lg).unwrap();
        let f = if self.causal {
            causal_linear_attention_backward
        } else {
            linear_attention_backward
        };
        f(
            q,
            k,
            v,
            g,
            &self.opts,
            Some(&self.init),
            Some(&self.d_final),
        )
        .unwrap()
    }
}

const H: f64 = 1e-6;

/// Central difference of the loss for every element of every input, compared
/// with the analytic gradient gathered from the same positions.
fn check(s: &Setup, what: &str) {
    let gr = s.grads();
    let p = &s.p;
    let mut fd = Vec::new();
    let mut an = Vec::new();
    let grad_of = |t: &linattn_reference::Tensor<f64>, b, h, n, x| t.row(b, h, n).unwrap()[x];
    for which in 0..3 {
        for b in 0..p.b {
            for h in 0..p.h {
                for t in 0..p.n {
                    let dim = if which == 2 { p.m } else { p.d };
                    for x in 0..dim {
                        let mut plus = p.clone();
                        let mut minus = p.clone();
                        let (bp, bm, l, gt) = match which {
                            0 => (&mut plus.q, &mut minus.q, p.lq, &gr.dq),
                            1 => (&mut plus.k, &mut minus.k, p.lk, &gr.dk),
                            _ => (&mut plus.v, &mut minus.v, p.lv, &gr.dv),
                        };
                        let o = l.offset(b, h, t) + x;
                        bp[o] += H;
                        bm[o] -= H;
                        fd.push((s.loss(&plus, &s.init) - s.loss(&minus, &s.init)) / (2.0 * H));
                        an.push(grad_of(gt, b, h, t, x));
                    }
                }
            }
        }
    }
    for i in 0..s.init.len() {
        for which in 0..2 {
            let len = if which == 0 { p.d * p.m } else { p.d };
            for x in 0..len {
                let (mut plus, mut minus) = (s.init.clone(), s.init.clone());
                if which == 0 {
                    plus[i].s[x] += H;
                    minus[i].s[x] -= H;
                    an.push(gr.d_initial[i].s[x]);
                } else {
                    plus[i].z[x] += H;
                    minus[i].z[x] -= H;
                    an.push(gr.d_initial[i].z[x]);
                }
                fd.push((s.loss(p, &plus) - s.loss(p, &minus)) / (2.0 * H));
            }
        }
    }
    let e = rel_l2_error(&an, &fd);
    assert!(
        e < 1e-6,
        "{what}: gradient rel error {e:e}\nanalytic {an:?}\nfd {fd:?}"
    );
}

fn setup(rng: &mut Rng, fm: FeatureMap, normalize: bool, causal: bool, with_state: bool) -> Setup {
    let (b, h, n, d, m) = (1, 2, 5, 3, 2);
    let orders = [Order::Bnhd, Order::Padded, Order::Bhnd];
    let p = Problem::new(rng, fm, b, h, n, d, m, orders);
    let g = rng.normal_vec(b * h * n * m);
    let (init, d_final) = if with_state {
        (
            random_states(rng, b * h, d, m),
            random_states(rng, b * h, d, m),
        )
    } else {
        (State::zeros_vec(b * h, d, m), State::zeros_vec(b * h, d, m))
    };
    let opts = LinearAttentionOptions {
        feature_map: fm,
        normalize,
        eps: 1e-6,
        scale: 0.7,
    };
    Setup {
        p,
        g,
        init,
        d_final,
        opts,
        causal,
    }
}

#[test]
fn gradients_match_finite_differences() {
    let mut rng = Rng::new(test_seed());
    for fm in FeatureMap::ALL {
        for normalize in [true, false] {
            for causal in [true, false] {
                for with_state in [true, false] {
                    let s = setup(&mut rng, fm, normalize, causal, with_state);
                    check(
                        &s,
                        &format!("{fm:?} normalize={normalize} causal={causal} state={with_state}"),
                    );
                }
            }
        }
    }
}

#[test]
fn varlen_backward_equals_each_sequence() {
    let mut rng = Rng::new(test_seed());
    let (h, d, m) = (2, 3, 4);
    let cu = [0, 4, 4, 9];
    let p = Problem::new(
        &mut rng,
        FeatureMap::EluPlusOne,
        1,
        h,
        9,
        d,
        m,
        [Order::Padded; 3],
    );
    let g = rng.normal_vec(9 * h * m);
    let lg = linattn_reference::Layout::packed(9, h, m);
    let init = random_states(&mut rng, 3 * h, d, m);
    let fin = random_states(&mut rng, 3 * h, d, m);
    let o = LinearAttentionOptions::default();
    let (q, k, v) = p.views();
    let gv = View::new(&g, lg).unwrap();
    let all =
        varlen_causal_linear_attention_backward(q, k, v, gv, &cu, &o, Some(&init), Some(&fin))
            .unwrap();
    for s in 0..3 {
        let (t0, t1) = (cu[s], cu[s + 1]);
        let one = causal_linear_attention_backward(
            cut(q, t0, t1),
            cut(k, t0, t1),
            cut(v, t0, t1),
            cut(gv, t0, t1),
            &o,
            Some(&init[s * h..(s + 1) * h]),
            Some(&fin[s * h..(s + 1) * h]),
        )
        .unwrap();
        for hh in 0..h {
            for t in t0..t1 {
                for (a, b) in [(&all.dq, &one.dq), (&all.dk, &one.dk), (&all.dv, &one.dv)] {
                    let e = rel_l2_error(a.row(0, hh, t).unwrap(), b.row(0, hh, t - t0).unwrap());
                    assert!(e < 1e-12, "seq {s} head {hh} token {t}: {e:e}");
                }
            }
        }
        assert!(
            rel_l2_error(
                &flat_states(&all.d_initial[s * h..(s + 1) * h]),
                &flat_states(&one.d_initial)
            ) < 1e-12
        );
    }
    // The empty sequence passes the final-state gradient straight through.
    assert_eq!(all.d_initial[h..2 * h], fin[h..2 * h]);
}
