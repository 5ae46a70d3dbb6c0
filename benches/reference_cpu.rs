//! CPU reference: causal linear attention (recurrent and chunked forms)
//! against causal softmax attention, f32, B = H = 1, D = M = 64, N = 64..16384.
//!
//! Bounded on purpose (10 samples, short measurement) so the whole run takes a
//! few minutes even though softmax is quadratic. Results: crates/reference/BENCH.md.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use linattn::reference::{
    causal_linear_attention_with, softmax_attention, testing::Rng, Form, Layout,
    LinearAttentionOptions, View,
};
use std::hint::black_box;
use std::time::Duration;

const D: usize = 64;
const M: usize = 64;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("reference_cpu_causal");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    let opts = LinearAttentionOptions::default();
    for shift in 6..=14 {
        let n = 1usize << shift;
        let mut rng = Rng::new(n as u64);
        let lq = Layout::bhnd(1, 1, n, D);
        let lv = Layout::bhnd(1, 1, n, M);
        let to32 = |x: Vec<f64>| x.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
        let q = to32(rng.normal_vec(n * D));
        let k = to32(rng.normal_vec(n * D));
        let v = to32(rng.normal_vec(n * M));
        let (q, k, v) = (
            View::new(&q, lq).unwrap(),
            View::new(&k, lq).unwrap(),
            View::new(&v, lv).unwrap(),
        );
        group.throughput(Throughput::Elements(n as u64));
        for (name, form) in [
            ("linear_recurrent", Form::Recurrent),
            ("linear_chunked64", Form::Chunked { chunk: 64 }),
        ] {
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| {
                    black_box(causal_linear_attention_with(form, q, k, v, &opts, None).unwrap())
                })
            });
        }
        group.bench_with_input(BenchmarkId::new("softmax", n), &n, |b, _| {
            b.iter(|| black_box(softmax_attention(q, k, v, true, None).unwrap()))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
