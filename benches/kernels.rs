//! GPU kernels at the anchor shapes of `docs/benchmarks.md` (bf16, D = M):
//! causal forward (auto schedule), causal forward + backward (what a
//! training step runs; FLA's published numbers are for this pair) and the
//! decode step. Criterion reports time and bytes/s (q, k, v, o for the
//! forward; q, k, v, o, dO, dq, dk, dv for forward + backward; the state
//! read + write for decode); the memory floor of each shape is printed next
//! to it.
//!
//! Without a GPU (or without kernels built by nvcc) this says so and benches
//! nothing on the device: the emulator is far too slow for these shapes. The
//! CPU reference has its own bench (`reference_cpu`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use linattn_kernels::ops::backward::{causal_backward, BackwardInputs, BackwardStates, Grads};
use linattn_kernels::ops::decode::{decode_step, DecodeShape};
use linattn_kernels::ops::forward::{
    causal_forward, AttentionOptions, AttentionShape, Qkv, StateIo,
};
use linattn_kernels::{BuildStatus, Device, Gpu};
use std::sync::Arc;
use std::time::Duration;

/// Device-to-device copy bandwidth assumed for the floors (H100 SXM).
const COPY_BW: f64 = 3.0e12;
/// (B, T, H, D = M): the anchor shapes.
const ANCHORS: [(usize, usize, usize, usize); 6] = [
    (1, 8192, 96, 128),
    (2, 16384, 16, 128),
    (4, 2048, 16, 128),
    (4, 4096, 64, 128),
    (8, 2048, 32, 256),
    (8, 1024, 8, 64),
];

fn gpu() -> Option<Device> {
    match (Gpu::new(0), linattn_kernels::build_status()) {
        (Ok(g), BuildStatus::Built { .. }) => Some(Device::Gpu(Arc::new(g))),
        (Ok(_), BuildStatus::NotBuilt(why)) => {
            eprintln!("kernels bench: GPU present but kernels not built ({why}); benching nothing on the device");
            None
        }
        (Err(e), _) => {
            eprintln!("kernels bench: no GPU ({e}); benching nothing on the device");
            None
        }
    }
}

/// Prints an anchor shape's memory floor (`bytes` of compulsory traffic at
/// [`COPY_BW`]), sets the group's throughput and names the benchmark.
fn anchor(
    what: &str,
    (b, t, h, d): (usize, usize, usize, usize),
    bytes: usize,
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
) -> BenchmarkId {
    eprintln!(
        "{what} B{b} T{t} H{h} D{d}: memory floor {:.3} ms at {:.1} TB/s",
        bytes as f64 / COPY_BW * 1e3,
        COPY_BW / 1e12
    );
    g.throughput(Throughput::Bytes(bytes as u64));
    BenchmarkId::from_parameter(format!("B{b}_T{t}_H{h}_D{d}"))
}

fn bench(c: &mut Criterion) {
    let Some(dev) = gpu() else { return };
    let mut g = c.benchmark_group("causal_forward_bf16");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(1));
    for (b, t, h, d) in ANCHORS {
        let n = b * t * h * d;
        let x = dev.upload(&vec![bf16::from_f32(0.01); n]).unwrap();
        let mut o = dev.upload(&vec![bf16::ZERO; n]).unwrap();
        let shape = AttentionShape::bnhd(b, h, t, d, d);
        let id = anchor("forward", (b, t, h, d), 4 * n * 2, &mut g);
        g.bench_function(id, |it| {
            it.iter(|| {
                let qkv = Qkv {
                    q: &x,
                    k: &x,
                    v: &x,
                };
                causal_forward(
                    &dev,
                    qkv,
                    &mut o,
                    &shape,
                    None,
                    &AttentionOptions::default(),
                    StateIo::none(),
                )
                .unwrap();
                dev.synchronize().unwrap();
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("causal_fwd_bwd_bf16");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(2));
    for (b, t, h, d) in ANCHORS {
        let n = b * t * h * d;
        let x = dev.upload(&vec![bf16::from_f32(0.01); n]).unwrap();
        let d_o = dev.upload(&vec![bf16::from_f32(0.01); n]).unwrap();
        let mut o = dev.upload(&vec![bf16::ZERO; n]).unwrap();
        let mut dq = dev.upload(&vec![bf16::ZERO; n]).unwrap();
        let mut dk = dev.upload(&vec![bf16::ZERO; n]).unwrap();
        let mut dv = dev.upload(&vec![bf16::ZERO; n]).unwrap();
        let shape = AttentionShape::bnhd(b, h, t, d, d);
        // Compulsory traffic: q, k, v, o, dO, dq, dk, dv once each.
        let id = anchor("fwd+bwd", (b, t, h, d), 8 * n * 2, &mut g);
        g.bench_function(id, |it| {
            it.iter(|| {
                let opts = AttentionOptions::default();
                let qkv = Qkv {
                    q: &x,
                    k: &x,
                    v: &x,
                };
                causal_forward(&dev, qkv, &mut o, &shape, None, &opts, StateIo::none()).unwrap();
                let inputs = BackwardInputs {
                    q: &x,
                    k: &x,
                    v: &x,
                    d_o: &d_o,
                };
                let grads = Grads {
                    dq: &mut dq,
                    dk: &mut dk,
                    dv: &mut dv,
                };
                causal_backward(
                    &dev,
                    inputs,
                    grads,
                    &shape,
                    None,
                    &opts,
                    BackwardStates::none(),
                )
                .unwrap();
                dev.synchronize().unwrap();
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("decode_step_bf16");
    g.sample_size(20).measurement_time(Duration::from_secs(1));
    for (b, h, d) in [
        (1, 96, 128),
        (8, 32, 128),
        (64, 32, 128),
        (8, 32, 256),
        (256, 8, 64),
    ] {
        let rows = b * h * d;
        let x = dev.upload(&vec![bf16::from_f32(0.01); rows]).unwrap();
        let mut o = dev.upload(&vec![bf16::ZERO; rows]).unwrap();
        let mut s = dev.upload(&vec![0f32; b * h * d * d]).unwrap();
        let mut z = dev.upload(&vec![1f32; b * h * d]).unwrap();
        let shape = DecodeShape::contiguous(b, h, d, d);
        g.throughput(Throughput::Bytes((b * h * (d * d + d) * 8) as u64));
        g.bench_function(
            BenchmarkId::from_parameter(format!("B{b}_H{h}_D{d}")),
            |it| {
                it.iter(|| {
                    let qkv = Qkv {
                        q: &x,
                        k: &x,
                        v: &x,
                    };
                    decode_step(
                        &dev,
                        qkv,
                        &mut o,
                        &mut s,
                        &mut z,
                        &shape,
                        &AttentionOptions::default(),
                    )
                    .unwrap();
                    dev.synchronize().unwrap();
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
