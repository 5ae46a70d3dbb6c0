//! Shared fixtures: random problems in either layout.

use linattn_reference::testing::Rng;
use linattn_reference::{FeatureMap, Layout, LinearAttentionOptions, State, View};

/// Which memory order a generated tensor uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Bhnd,
    Bnhd,
    /// `[B, N, H, D]` with padding after every row and every token.
    Padded,
}

impl Order {
    pub fn pick(rng: &mut Rng) -> Order {
        [Order::Bhnd, Order::Bnhd, Order::Padded][rng.range(0, 2)]
    }

    pub fn layout(self, b: usize, h: usize, n: usize, d: usize) -> Layout {
        match self {
            Order::Bhnd => Layout::bhnd(b, h, n, d),
            Order::Bnhd => Layout::bnhd(b, h, n, d),
            Order::Padded => {
                let head_stride = d + 1;
                let token_stride = h * head_stride + 2;
                Layout {
                    batch: b,
                    heads: h,
                    tokens: n,
                    dim: d,
                    batch_stride: n * token_stride + 3,
                    token_stride,
                    head_stride,
                }
            }
        }
    }
}

/// A random problem: q, k (dim d) and v (dim m) in independently chosen layouts.
#[derive(Debug, Clone)]
pub struct Problem {
    pub b: usize,
    pub h: usize,
    pub n: usize,
    pub d: usize,
    pub m: usize,
    pub q: Vec<f64>,
    pub k: Vec<f64>,
    pub v: Vec<f64>,
    pub lq: Layout,
    pub lk: Layout,
    pub lv: Layout,
}

/// Values for q and k that suit the feature map: positive for the identity
/// map (so normalisers stay away from zero), and away from 0 otherwise (so
/// relu's kink never sits within a finite-difference step).
pub fn feature_input(rng: &mut Rng, fm: FeatureMap) -> f64 {
    match fm {
        FeatureMap::Identity => rng.uniform(0.1, 1.0),
        _ => {
            let x = rng.uniform(0.1, 1.5);
            if rng.bool() {
                x
            } else {
                -x
            }
        }
    }
}

impl Problem {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rng: &mut Rng,
        fm: FeatureMap,
        b: usize,
        h: usize,
        n: usize,
        d: usize,
        m: usize,
        orders: [Order; 3],
    ) -> Problem {
        let lq = orders[0].layout(b, h, n, d);
        let lk = orders[1].layout(b, h, n, d);
        let lv = orders[2].layout(b, h, n, m);
        // Padding gaps hold NaN: reading one would poison the result.
        let mut q = vec![f64::NAN; lq.required_len().unwrap()];
        let mut k = vec![f64::NAN; lk.required_len().unwrap()];
        let mut v = vec![f64::NAN; lv.required_len().unwrap()];
        for bb in 0..b {
            for hh in 0..h {
                for t in 0..n {
                    let (oq, ok, ov) = (
                        lq.offset(bb, hh, t),
                        lk.offset(bb, hh, t),
                        lv.offset(bb, hh, t),
                    );
                    for x in 0..d {
                        q[oq + x] = feature_input(rng, fm);
                        k[ok + x] = feature_input(rng, fm);
                    }
                    for x in 0..m {
                        v[ov + x] = rng.normal();
                    }
                }
            }
        }
        Problem {
            b,
            h,
            n,
            d,
            m,
            q,
            k,
            v,
            lq,
            lk,
            lv,
        }
    }

    /// Random shape (small) and random layouts.
    pub fn random(rng: &mut Rng, fm: FeatureMap) -> Problem {
        let n = if rng.bool() {
            rng.range(1, 3)
        } else {
            rng.range(1, 40)
        };
        let (b, h) = (rng.range(1, 2), rng.range(1, 3));
        let (d, m) = (rng.range(1, 9), rng.range(1, 9));
        let orders = [Order::pick(rng), Order::pick(rng), Order::pick(rng)];
        Problem::new(rng, fm, b, h, n, d, m, orders)
    }

    pub fn views(&self) -> (View<'_, f64>, View<'_, f64>, View<'_, f64>) {
        (
            View::new(&self.q, self.lq).unwrap(),
            View::new(&self.k, self.lk).unwrap(),
            View::new(&self.v, self.lv).unwrap(),
        )
    }

    pub fn states(&self, rng: &mut Rng) -> Vec<State<f64>> {
        random_states(rng, self.b * self.h, self.d, self.m)
    }
}

/// Random states with a positive z (a plausible history of positive features).
pub fn random_states(rng: &mut Rng, count: usize, d: usize, m: usize) -> Vec<State<f64>> {
    (0..count)
        .map(|_| State {
            d,
            m,
            s: rng.normal_vec(d * m),
            z: rng.uniform_vec(d, 0.5, 2.0),
        })
        .collect()
}

pub fn random_opts(rng: &mut Rng, fm: FeatureMap) -> LinearAttentionOptions {
    LinearAttentionOptions {
        feature_map: fm,
        normalize: rng.bool(),
        eps: 1e-6,
        scale: if rng.bool() {
            1.0
        } else {
            rng.uniform(0.2, 2.0)
        },
    }
}

/// Concatenated S and z of every state, for comparisons.
pub fn flat_states(states: &[State<f64>]) -> Vec<f64> {
    states
        .iter()
        .flat_map(|s| s.s.iter().chain(&s.z).copied())
        .collect()
}

/// Tokens `t0..t1` of a view.
pub fn cut(x: View<'_, f64>, t0: usize, t1: usize) -> View<'_, f64> {
    x.slice_tokens(t0, t1).unwrap()
}
