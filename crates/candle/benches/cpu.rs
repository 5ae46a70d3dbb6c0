//! The CPU path of linattn-candle against the same formula written with
//! candle ops, side by side: causal linear attention, f32, B = 1, H = 8,
//! D = M = 64, N in {1K, 4K, 16K}; forward, and forward + backward.
//!
//! candle ops: a masked N x N matmul where it fits (N = 1K), and a chunked
//! form (chunks of 256: masked 256 x 256 products inside, the state carried
//! across) for every N. Bounded (10 samples) so the run takes minutes.
//! Results: docs/benchmarks.md ("linattn-candle on the CPU").

use candle_core::{DType, Device, Tensor, Var, D};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use linattn_candle::{linear_attention, AttentionOptions, QkvLayout};
use std::hint::black_box;
use std::time::Duration;

const H: usize = 8;
const DIM: usize = 64;
const EPS: f64 = 1e-6;

fn phi(x: &Tensor) -> Tensor {
    (x.elu(1.0).unwrap() + 1.0).unwrap()
}

/// Masked N x N matmul (elu+1, normalised).
fn candle_masked(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let (qh, kh) = (phi(q), phi(k));
    let n = q.dim(2).unwrap();
    let mask = Tensor::tril2(n, DType::F32, q.device()).unwrap();
    let a = qh
        .matmul(&kh.t().unwrap())
        .unwrap()
        .broadcast_mul(&mask)
        .unwrap();
    let den = (a.sum_keepdim(D::Minus1).unwrap() + EPS).unwrap();
    a.matmul(v).unwrap().broadcast_div(&den).unwrap()
}

/// Chunked: masked products inside a chunk, the state S, z across chunks.
fn candle_chunked(q: &Tensor, k: &Tensor, v: &Tensor, chunk: usize) -> Tensor {
    let (b, h, n, d) = q.dims4().unwrap();
    let m = v.dim(3).unwrap();
    let (qh, kh) = (phi(q), phi(k));
    let mut s = Tensor::zeros((b, h, d, m), DType::F32, q.device()).unwrap();
    let mut z = Tensor::zeros((b, h, 1, d), DType::F32, q.device()).unwrap();
    let mask = Tensor::tril2(chunk, DType::F32, q.device()).unwrap();
    let mut outs = vec![];
    for t0 in (0..n).step_by(chunk) {
        let c = chunk.min(n - t0);
        let (qc, kc, vc) = (
            qh.narrow(2, t0, c).unwrap(),
            kh.narrow(2, t0, c).unwrap(),
            v.narrow(2, t0, c).unwrap(),
        );
        let mask = if c == chunk {
            mask.clone()
        } else {
            mask.narrow(0, 0, c).unwrap().narrow(1, 0, c).unwrap()
        };
        let a = qc
            .matmul(&kc.t().unwrap())
            .unwrap()
            .broadcast_mul(&mask)
            .unwrap();
        let num = (qc.matmul(&s).unwrap() + a.matmul(&vc).unwrap()).unwrap();
        let qz = qc
            .broadcast_mul(&z)
            .unwrap()
            .sum_keepdim(D::Minus1)
            .unwrap();
        let den = ((qz + a.sum_keepdim(D::Minus1).unwrap()).unwrap() + EPS).unwrap();
        outs.push(num.broadcast_div(&den).unwrap());
        s = (s + kc.t().unwrap().matmul(&vc).unwrap()).unwrap();
        z = (z + kc.sum_keepdim(2).unwrap()).unwrap();
    }
    Tensor::cat(&outs, 2).unwrap()
}

fn inputs(n: usize) -> (Var, Var, Var, Tensor) {
    let dev = Device::Cpu;
    let r =
        |dim| Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, H, n, dim), &dev).unwrap()).unwrap();
    let w = Tensor::randn(0f32, 1.0, (1, H, n, DIM), &dev).unwrap();
    (r(DIM), r(DIM), r(DIM), w)
}

fn bench(c: &mut Criterion) {
    let opts = AttentionOptions::default();
    for (pass, train) in [("forward", false), ("forward_backward", true)] {
        let mut group = c.benchmark_group(format!("candle_cpu_causal_{pass}"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
        for n in [1024usize, 4096, 16384] {
            let (q, k, v, w) = inputs(n);
            let (q, k, v) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
            group.throughput(Throughput::Elements(n as u64));
            let run = |o: Tensor| {
                if train {
                    let g = (o * &w).unwrap().sum_all().unwrap().backward().unwrap();
                    black_box(g.get(q).unwrap().dims()[0]);
                } else {
                    black_box(o);
                }
            };
            group.bench_with_input(BenchmarkId::new("linattn_candle", n), &n, |bch, _| {
                bch.iter(|| run(linear_attention(q, k, v, QkvLayout::Bhnd, true, &opts).unwrap()))
            });
            group.bench_with_input(
                BenchmarkId::new("candle_ops_chunked256", n),
                &n,
                |bch, _| bch.iter(|| run(candle_chunked(q, k, v, 256))),
            );
            if n <= 1024 {
                group.bench_with_input(BenchmarkId::new("candle_ops_masked", n), &n, |bch, _| {
                    bch.iter(|| run(candle_masked(q, k, v)))
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
