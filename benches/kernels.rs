//! GPU kernels at the anchor shapes of `docs/benchmarks.md` (bf16, D = M)
//! and a sweep of N: causal and non-causal forward, causal forward +
//! backward (what a training step runs; FLA's published numbers are for
//! this pair), the decode step and the standalone feature map.
//!
//! Criterion reports time and bytes/s per case. The run then ends with one
//! table timed with CUDA events on the stream (median of 20 after 3 warm-up
//! runs): ms, achieved GB/s, % of the memory floor, where the floor is the
//! case's compulsory bytes over the device-to-device copy bandwidth measured
//! at the start of the same run, and the tensor work's TFLOP/s where it is
//! defined. `LINATTN_BENCH_TABLE=path` also writes the table there
//! (`scripts/gpu-check.sh` does). `LINATTN_BENCH_ANCHORS=n` benches only
//! the forward and forward + backward at the first `n` anchor shapes (no
//! sweep, decode or feature map: `scripts/gpu-check.sh --quick` uses 1).
//!
//! Without a GPU (or without kernels built by nvcc) this says so and benches
//! nothing on the device: the emulator is far too slow for these shapes. The
//! CPU reference has its own bench (`reference_cpu`).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion};
use criterion::{Bencher, Throughput};
use cudarc::driver::sys::CUevent_flags;
use half::bf16;
use linattn_kernels::ops::tuning::forward::tiling;
use linattn_kernels::{backward, BackwardInputs, BackwardStates, Grads, Kind};
use linattn_kernels::{decode_step, DecodeShape};
use linattn_kernels::{feature_map, RowsShape};
use linattn_kernels::{forward, AttentionOptions, AttentionShape, Qkv, StateIo};
use linattn_kernels::{BuildStatus, DType, Device, FeatureMap, Gpu};

/// (B, T, H, D = M): the anchor shapes.
const ANCHORS: [(usize, usize, usize, usize); 6] = [
    (1, 8192, 96, 128),
    (2, 16384, 16, 128),
    (4, 2048, 16, 128),
    (4, 4096, 64, 128),
    (8, 2048, 32, 256),
    (8, 1024, 8, 64),
];
/// The sweep of N: B 1, H 32, D = M = 128 (walk at large N, split at small).
const SWEEP_N: [usize; 5] = [512, 2048, 8192, 32768, 131072];
const SWEEP_H: usize = 32;

/// The first `LINATTN_BENCH_ANCHORS` anchor shapes, or `None` for the
/// whole bench.
fn quick_anchors() -> Option<usize> {
    let n = std::env::var("LINATTN_BENCH_ANCHORS").ok()?;
    match n.trim().parse::<usize>() {
        Ok(n) if (1..=ANCHORS.len()).contains(&n) => Some(n),
        _ => panic!(
            "LINATTN_BENCH_ANCHORS={n:?}: expected 1 to {}",
            ANCHORS.len()
        ),
    }
}

fn gpu() -> Option<(Device, Arc<Gpu>)> {
    match (Gpu::new(0), linattn_kernels::build_status()) {
        (Ok(g), BuildStatus::Built { .. }) => {
            let g = Arc::new(g);
            Some((Device::Gpu(g.clone()), g))
        }
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

/// Median milliseconds of `f`'s stream work between two timing events.
fn event_ms(g: &Gpu, mut f: impl FnMut()) -> f64 {
    let st = g.stream();
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    for _ in 0..3 {
        f();
    }
    let mut ms: Vec<f64> = (0..20)
        .map(|_| {
            let a = st.record_event(flags).expect("cuEventRecord");
            f();
            let b = st.record_event(flags).expect("cuEventRecord");
            a.elapsed_ms(&b).expect("cuEventElapsedTime") as f64
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    ms[ms.len() / 2]
}

/// Device-to-device copy bandwidth (bytes read + written per second) of
/// 1 GiB: the ceiling the memory floors use.
fn copy_bandwidth(g: &Gpu) -> f64 {
    let st = g.stream();
    let n = 1usize << 30;
    let src = st.alloc_zeros::<u8>(n).expect("cuMemAlloc 1 GiB");
    let mut dst = st.alloc_zeros::<u8>(n).expect("cuMemAlloc 1 GiB");
    let ms = event_ms(g, || st.memcpy_dtod(&src, &mut dst).expect("cuMemcpyDtoD"));
    2.0 * n as f64 / (ms * 1e-3)
}

/// One row of the closing table.
struct Row {
    group: &'static str,
    case: String,
    ms: f64,
    bytes: f64,
    flops: Option<f64>,
}

/// Benches one case in criterion (synchronised per iteration) and times it
/// with events for the table.
struct Bench<'a> {
    dev: &'a Device,
    gpu: &'a Gpu,
    rows: Vec<Row>,
}

impl Bench<'_> {
    fn case(
        &mut self,
        g: &mut BenchmarkGroup<'_, WallTime>,
        group: &'static str,
        case: String,
        bytes: usize,
        flops: Option<f64>,
        mut run: impl FnMut(),
    ) {
        g.throughput(Throughput::Bytes(bytes as u64));
        let dev = self.dev;
        g.bench_function(
            BenchmarkId::from_parameter(&case),
            |it: &mut Bencher<'_>| {
                it.iter(|| {
                    run();
                    dev.synchronize().unwrap();
                })
            },
        );
        let ms = event_ms(self.gpu, &mut run);
        self.rows.push(Row {
            group,
            case,
            ms,
            bytes: bytes as f64,
            flops,
        });
    }
}

/// Tensor FLOPs of the chunked causal forward per token and head (chunk
/// `c`): `S += phi(K)^T V` and `phi(Q) S` (`4 D M`) and the in-chunk scores
/// and `A V` (`2 c (D + M)`), the formula of docs/benchmarks.md.
fn causal_flops(d: usize, m: usize) -> f64 {
    let c = tiling(DType::Bf16, d, m).chunk;
    (4 * d * m + 2 * c * (d + m)) as f64
}

fn shape_name((b, t, h, d): (usize, usize, usize, usize)) -> String {
    format!("B{b}_T{t}_H{h}_D{d}")
}

fn forward_cases(c: &mut Criterion, bench: &mut Bench<'_>) {
    let dev = bench.dev;
    for (group, causal) in [
        ("causal_forward_bf16", true),
        ("noncausal_forward_bf16", false),
    ] {
        let mut g = c.benchmark_group(group);
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(200))
            .measurement_time(Duration::from_secs(1));
        let sweep = SWEEP_N.map(|t| (1, t, SWEEP_H, 128));
        let (anchors, sweep) = match quick_anchors() {
            Some(n) => (&ANCHORS[..n], &[][..]),
            None => (&ANCHORS[..], &sweep[..]),
        };
        let shapes = if causal {
            &[anchors, sweep]
        } else {
            &[anchors, &[][..]]
        };
        for &(b, t, h, d) in shapes.iter().flat_map(|s| s.iter()) {
            let n = b * t * h * d;
            let x = dev.upload(&vec![bf16::from_f32(0.01); n]).unwrap();
            let mut o = dev.upload(&vec![bf16::ZERO; n]).unwrap();
            let shape = AttentionShape::bnhd(b, h, t, d, d);
            let per_token_head = if causal {
                causal_flops(d, d)
            } else {
                (4 * d * d) as f64
            };
            let flops = per_token_head * (b * t * h) as f64;
            let kind = if causal {
                Kind::Causal
            } else {
                Kind::NonCausal
            };
            // Compulsory traffic: q, k, v read and o written once.
            bench.case(
                &mut g,
                group,
                shape_name((b, t, h, d)),
                4 * n * 2,
                Some(flops),
                || {
                    let qkv = Qkv {
                        q: &x,
                        k: &x,
                        v: &x,
                    };
                    let opts = AttentionOptions::default();
                    forward(kind, dev, qkv, &mut o, &shape, None, &opts, StateIo::none()).unwrap();
                },
            );
        }
        g.finish();
    }
}

fn backward_cases(c: &mut Criterion, bench: &mut Bench<'_>) {
    let dev = bench.dev;
    let group = "causal_fwd_bwd_bf16";
    let mut g = c.benchmark_group(group);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(2));
    for &(b, t, h, d) in &ANCHORS[..quick_anchors().unwrap_or(ANCHORS.len())] {
        let n = b * t * h * d;
        let x = dev.upload(&vec![bf16::from_f32(0.01); n]).unwrap();
        let d_o = dev.upload(&vec![bf16::from_f32(0.01); n]).unwrap();
        let mut o = dev.upload(&vec![bf16::ZERO; n]).unwrap();
        let mut dq = dev.upload(&vec![bf16::ZERO; n]).unwrap();
        let mut dk = dev.upload(&vec![bf16::ZERO; n]).unwrap();
        let mut dv = dev.upload(&vec![bf16::ZERO; n]).unwrap();
        let shape = AttentionShape::bnhd(b, h, t, d, d);
        // Compulsory traffic: q, k, v, o, dO, dq, dk, dv once each.
        bench.case(
            &mut g,
            group,
            shape_name((b, t, h, d)),
            8 * n * 2,
            None,
            || {
                let opts = AttentionOptions::default();
                let qkv = Qkv {
                    q: &x,
                    k: &x,
                    v: &x,
                };
                forward(
                    Kind::Causal,
                    dev,
                    qkv,
                    &mut o,
                    &shape,
                    None,
                    &opts,
                    StateIo::none(),
                )
                .unwrap();
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
                let states = BackwardStates::none();
                backward(
                    Kind::Causal,
                    dev,
                    inputs,
                    grads,
                    &shape,
                    None,
                    &opts,
                    states,
                )
                .unwrap();
            },
        );
    }
    g.finish();
}

fn decode_and_feature_map_cases(c: &mut Criterion, bench: &mut Bench<'_>) {
    let dev = bench.dev;
    let group = "decode_step_bf16";
    let mut g = c.benchmark_group(group);
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
        // The fp32 state read and written, and q, k, v, o rows.
        let bytes = b * h * (d * d + d) * 8 + 4 * rows * 2;
        let flops = (b * h * 4 * d * d) as f64;
        bench.case(
            &mut g,
            group,
            format!("B{b}_H{h}_D{d}"),
            bytes,
            Some(flops),
            || {
                let qkv = Qkv {
                    q: &x,
                    k: &x,
                    v: &x,
                };
                let opts = AttentionOptions::default();
                decode_step(dev, qkv, &mut o, &mut s, &mut z, &shape, &opts).unwrap();
            },
        );
    }
    g.finish();
    let group = "feature_map_bf16";
    let mut g = c.benchmark_group(group);
    g.sample_size(20).measurement_time(Duration::from_secs(1));
    for (rows, cols) in [(8192 * 96, 128), (16384 * 16, 256)] {
        let x = dev
            .upload(&vec![bf16::from_f32(0.01); rows * cols])
            .unwrap();
        let mut y = dev.upload(&vec![bf16::ZERO; rows * cols]).unwrap();
        let shape = RowsShape::contiguous(rows, cols);
        bench.case(
            &mut g,
            group,
            format!("{rows}x{cols}"),
            2 * rows * cols * 2,
            None,
            || {
                feature_map(dev, &x, &mut y, &shape, FeatureMap::EluPlusOne).unwrap();
            },
        );
    }
    g.finish();
}

fn table(rows: &[Row], copy_bw: f64, device: &str) -> String {
    let mut t = format!(
        "kernels bench on {device}; device-to-device copy {:.2} TB/s (read + write), the memory floors' ceiling\n\n\
         | group | case | ms | GB/s | % of memory floor | TFLOP/s |\n|---|---|---:|---:|---:|---:|\n",
        copy_bw / 1e12
    );
    for r in rows {
        let floor_ms = r.bytes / copy_bw * 1e3;
        let tflops = r.flops.map_or("-".to_string(), |f| {
            format!("{:.1}", f / (r.ms * 1e-3) / 1e12)
        });
        let _ = writeln!(
            t,
            "| {} | {} | {:.4} | {:.0} | {:.0}% | {} |",
            r.group,
            r.case,
            r.ms,
            r.bytes / (r.ms * 1e-3) / 1e9,
            100.0 * floor_ms / r.ms,
            tflops
        );
    }
    t
}

fn bench(c: &mut Criterion) {
    let Some((dev, gpu)) = gpu() else { return };
    let copy_bw = copy_bandwidth(&gpu);
    let mut bench = Bench {
        dev: &dev,
        gpu: &gpu,
        rows: Vec::new(),
    };
    forward_cases(c, &mut bench);
    backward_cases(c, &mut bench);
    if quick_anchors().is_none() {
        decode_and_feature_map_cases(c, &mut bench);
    }
    let t = table(&bench.rows, copy_bw, &dev.describe());
    eprintln!("\n{t}");
    if let Some(path) = std::env::var_os("LINATTN_BENCH_TABLE") {
        if let Err(e) = std::fs::write(&path, &t) {
            eprintln!(
                "kernels bench: cannot write {}: {e}",
                path.to_string_lossy()
            );
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
