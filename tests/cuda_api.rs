//! On a GPU, the cudarc-typed (`*_cuda`) and raw-address (`*_raw`) entry
//! points give the same bits as the [`Device`] entry points (all three build
//! the same plan; this checks the glue: pointers, strides, workspace,
//! offsets, states). Forward (varlen, final state), backward (whole-head
//! walks, initial state, d_initial), decode and the feature map.
//!
//! Also: two threads sharing one `Gpu` with different shared-memory sizes
//! of the same kernel (the attribute is set once, at load, never per
//! launch), empty buffers, and the `LINATTN_SYNC_LAUNCHES` switch.
//!
//! GPU only: without one it says so and checks nothing here (with
//! `LINATTN_TEST_DEVICES=gpu`, as the GPU check runs it, that is a failure). On every
//! machine the raw entry points run through the emulator in
//! `tests/index64.rs`, and the `Device` ones everywhere else.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr};
use half::bf16;
use linattn_kernels::ops::backward;
use linattn_kernels::ops::forward;
use linattn_kernels::ops::forward::Lens;
use linattn_kernels::{decode_step, DecodeShape};
use linattn_kernels::{feature_map, RowsShape};
use linattn_kernels::{
    AttentionOptions, AttentionShape, Kind, Qkv, RawForward, ScheduleChoice, StateIo, StateMut,
    StateRef,
};
use linattn_kernels::{BackwardInputs, BackwardStates, Grads, RawBackward};
use linattn_kernels::{Buffer, BuildStatus, Device, Element, Executor, Gpu};
use linattn_reference::testing::{rel_l2_error, test_seed, Rng};

fn gpu() -> Option<Arc<Gpu>> {
    let why = match (Gpu::new(0), linattn_kernels::build_status()) {
        (Ok(g), BuildStatus::Built { .. }) => return Some(Arc::new(g)),
        (Ok(_), BuildStatus::NotBuilt(why)) => format!("kernels not built ({why})"),
        (Err(e), _) => e.to_string(),
    };
    // As tests/common's `devices()`: a run that asked for the GPU only (the
    // GPU check) must not pass on nothing.
    if std::env::var("LINATTN_TEST_DEVICES").is_ok_and(|v| v == "gpu") {
        panic!("LINATTN_TEST_DEVICES=gpu, but GPU skipped: {why}");
    }
    eprintln!("GPU skipped: {why}");
    None
}

fn slice<T>(b: &Buffer<T>) -> &CudaSlice<T> {
    match b {
        Buffer::Cuda(s) => s,
        Buffer::Host(_) => panic!("a GPU Device gave a host buffer"),
    }
}

fn slice_mut<T>(b: &mut Buffer<T>) -> &mut CudaSlice<T> {
    match b {
        Buffer::Cuda(s) => s,
        Buffer::Host(_) => panic!("a GPU Device gave a host buffer"),
    }
}

fn addr<T>(g: &Gpu, s: &CudaSlice<T>) -> u64 {
    let (p, guard) = s.device_ptr(g.stream());
    drop(guard);
    p
}

fn bits<T: Element>(dev: &Device, b: &Buffer<T>) -> Vec<u64> {
    dev.download(b)
        .unwrap()
        .iter()
        .map(|x| x.to_f64().to_bits())
        .collect()
}

fn random<T: Element>(dev: &Device, rng: &mut Rng, n: usize) -> Buffer<T> {
    let x: Vec<T> = rng.normal_vec(n).iter().map(|&v| T::from_f64(v)).collect();
    dev.upload(&x).unwrap()
}

fn nan<T: Element>(dev: &Device, n: usize) -> Buffer<T> {
    dev.upload(&vec![T::nan(); n]).unwrap()
}

#[test]
fn cuda_and_raw_entry_points_match_device_bits() {
    let Some(g) = gpu() else { return };
    let dev = Device::Gpu(g.clone());
    let mut rng = Rng::new(test_seed());
    let (h, d, m) = (2, 64, 64);
    let cu = [0usize, 40, 40, 100];
    let total = 100;
    let shape = AttentionShape::packed(total, h, d, m);
    let opts = AttentionOptions::default();
    let (q, k, v) = (
        random::<bf16>(&dev, &mut rng, total * h * d),
        random::<bf16>(&dev, &mut rng, total * h * d),
        random::<bf16>(&dev, &mut rng, total * h * m),
    );
    let states = (cu.len() - 1) * h;

    // Forward: Device, cudarc-typed, raw; varlen with a final state.
    let mut outs = Vec::new();
    for path in 0..3 {
        let mut o = nan::<bf16>(&dev, total * h * m);
        let mut fs = nan::<f32>(&dev, states * d * m);
        let mut fz = nan::<f32>(&dev, states * d);
        match path {
            0 => forward(
                Kind::Causal,
                &dev,
                Qkv {
                    q: &q,
                    k: &k,
                    v: &v,
                },
                &mut o,
                &shape,
                Some(&cu),
                &opts,
                StateIo::final_only(StateMut {
                    s: &mut fs,
                    z: &mut fz,
                }),
            ),
            1 => forward::<_, bf16, _, _, CudaSlice<f32>, _>(
                Kind::Causal,
                &*g,
                Qkv {
                    q: slice(&q),
                    k: slice(&k),
                    v: slice(&v),
                },
                slice_mut(&mut o),
                &shape,
                Some(&cu),
                &opts,
                StateIo {
                    initial: None,
                    final_state: Some(StateMut {
                        s: slice_mut(&mut fs),
                        z: slice_mut(&mut fz),
                    }),
                },
            ),
            _ => {
                let lens = Lens::unknown(false, true);
                let problem = forward::validate(
                    "cuda_api",
                    bf16::DTYPE,
                    &shape,
                    Some(&cu),
                    &opts,
                    &lens,
                    &g.target(),
                )
                .unwrap();
                let ws_len = forward::workspace_len(linattn_kernels::Kind::Causal, &problem, &opts);
                let ws = g.stream().alloc_zeros::<f32>(ws_len.max(1)).unwrap();
                let cu64: Vec<i64> = cu.iter().map(|&c| c as i64).collect();
                let cu_dev = g.stream().clone_htod(&cu64).unwrap();
                let ptrs = RawForward {
                    q: addr(&g, slice(&q)),
                    k: addr(&g, slice(&k)),
                    v: addr(&g, slice(&v)),
                    o: addr(&g, slice(&o)),
                    final_s: addr(&g, slice(&fs)),
                    final_z: addr(&g, slice(&fz)),
                    cu_seqlens: addr(&g, &cu_dev),
                    workspace: if ws_len == 0 { 0 } else { addr(&g, &ws) },
                    workspace_len: ws_len,
                    ..RawForward::default()
                };
                // SAFETY: device memory of this context covering every
                // tensor; the temporaries live until the synchronize below.
                let r = unsafe {
                    forward::forward_raw(
                        Kind::Causal,
                        &*g,
                        bf16::DTYPE,
                        &ptrs,
                        &shape,
                        Some(&cu),
                        &opts,
                    )
                };
                g.synchronize().unwrap();
                r
            }
        }
        .unwrap_or_else(|e| panic!("forward path {path}: {e}"));
        outs.push((bits(&dev, &o), bits(&dev, &fs), bits(&dev, &fz)));
    }
    assert!(outs[0].0.iter().all(|&b| !f64::from_bits(b).is_nan()));
    assert_eq!(outs[0], outs[1], "forward: cudarc-typed vs Device");
    assert_eq!(outs[0], outs[2], "forward: raw vs Device");

    // Backward (dense, whole-head walks; walk and split), initial state in,
    // d_initial out.
    for schedule in [ScheduleChoice::Auto, ScheduleChoice::Split { parts: 2 }] {
        let opts = AttentionOptions {
            schedule,
            ..AttentionOptions::default()
        };
        // Backward (dense, whole-head walks), initial state in, d_initial out.
        let shape = AttentionShape::bnhd(2, h, 70, d, m);
        let n = 2 * 70 * h;
        let (q, k, v, d_o) = (
            random::<bf16>(&dev, &mut rng, n * d),
            random::<bf16>(&dev, &mut rng, n * d),
            random::<bf16>(&dev, &mut rng, n * m),
            random::<bf16>(&dev, &mut rng, n * m),
        );
        let s0 = random::<f32>(&dev, &mut rng, 2 * h * d * m);
        let z0: Buffer<f32> = dev.upload(&vec![1.5f32; 2 * h * d]).unwrap();
        let mut grads = Vec::new();
        for path in 0..3 {
            let (mut dq, mut dk, mut dv) = (
                nan::<bf16>(&dev, n * d),
                nan::<bf16>(&dev, n * d),
                nan::<bf16>(&dev, n * m),
            );
            let mut ds = nan::<f32>(&dev, 2 * h * d * m);
            let mut dz = nan::<f32>(&dev, 2 * h * d);
            match path {
                0 => backward(
                    Kind::Causal,
                    &dev,
                    BackwardInputs {
                        q: &q,
                        k: &k,
                        v: &v,
                        d_o: &d_o,
                    },
                    Grads {
                        dq: &mut dq,
                        dk: &mut dk,
                        dv: &mut dv,
                    },
                    &shape,
                    None,
                    &opts,
                    BackwardStates {
                        initial: Some(StateRef { s: &s0, z: &z0 }),
                        d_final: None,
                        d_initial: Some(StateMut {
                            s: &mut ds,
                            z: &mut dz,
                        }),
                    },
                ),
                1 => backward::<_, bf16, _, _, _, _>(
                    Kind::Causal,
                    &*g,
                    BackwardInputs {
                        q: slice(&q),
                        k: slice(&k),
                        v: slice(&v),
                        d_o: slice(&d_o),
                    },
                    Grads {
                        dq: slice_mut(&mut dq),
                        dk: slice_mut(&mut dk),
                        dv: slice_mut(&mut dv),
                    },
                    &shape,
                    None,
                    &opts,
                    BackwardStates {
                        initial: Some(StateRef {
                            s: slice(&s0),
                            z: slice(&z0),
                        }),
                        d_final: None,
                        d_initial: Some(StateMut {
                            s: slice_mut(&mut ds),
                            z: slice_mut(&mut dz),
                        }),
                    },
                ),
                _ => {
                    let lens = Lens::unknown(true, false);
                    let glens = backward::GradLens::unknown(false, true);
                    let bp = backward::validate(
                        "cuda_api",
                        bf16::DTYPE,
                        &shape,
                        None,
                        &opts,
                        &lens,
                        &glens,
                        &g.target(),
                    )
                    .unwrap();
                    let ws_len = backward::workspace_len(&bp);
                    let ws = g.stream().alloc_zeros::<f32>(ws_len.max(1)).unwrap();
                    let ptrs = RawBackward {
                        q: addr(&g, slice(&q)),
                        k: addr(&g, slice(&k)),
                        v: addr(&g, slice(&v)),
                        d_o: addr(&g, slice(&d_o)),
                        dq: addr(&g, slice(&dq)),
                        dk: addr(&g, slice(&dk)),
                        dv: addr(&g, slice(&dv)),
                        initial_s: addr(&g, slice(&s0)),
                        initial_z: addr(&g, slice(&z0)),
                        d_initial_s: addr(&g, slice(&ds)),
                        d_initial_z: addr(&g, slice(&dz)),
                        workspace: if ws_len == 0 { 0 } else { addr(&g, &ws) },
                        workspace_len: ws_len,
                        ..RawBackward::default()
                    };
                    // SAFETY: as for the forward.
                    let r = unsafe {
                        backward::backward_raw(
                            Kind::Causal,
                            &*g,
                            bf16::DTYPE,
                            &ptrs,
                            &shape,
                            None,
                            &opts,
                        )
                    };
                    g.synchronize().unwrap();
                    r
                }
            }
            .unwrap_or_else(|e| panic!("backward path {path}: {e}"));
            grads.push([
                bits(&dev, &dq),
                bits(&dev, &dk),
                bits(&dev, &dv),
                bits(&dev, &ds),
                bits(&dev, &dz),
            ]);
        }
        assert!(grads[0][0].iter().all(|&b| !f64::from_bits(b).is_nan()));
        assert_eq!(
            grads[0], grads[1],
            "backward {schedule:?}: cudarc-typed vs Device"
        );
        assert_eq!(grads[0], grads[2], "backward {schedule:?}: raw vs Device");
    }

    // Decode (state updated in place) and the feature map.
    let ds = DecodeShape::contiguous(3, h, d, m);
    let (q, k, v) = (
        random::<bf16>(&dev, &mut rng, 3 * h * d),
        random::<bf16>(&dev, &mut rng, 3 * h * d),
        random::<bf16>(&dev, &mut rng, 3 * h * m),
    );
    let s_init: Vec<f32> = rng
        .normal_vec(3 * h * d * m)
        .iter()
        .map(|&x| x as f32)
        .collect();
    let mut steps = Vec::new();
    for path in 0..2 {
        let mut o = nan::<bf16>(&dev, 3 * h * m);
        let mut s = dev.upload(&s_init).unwrap();
        let mut z = dev.upload(&vec![2.0f32; 3 * h * d]).unwrap();
        if path == 0 {
            let x = Qkv {
                q: &q,
                k: &k,
                v: &v,
            };
            decode_step(&dev, x, &mut o, &mut s, &mut z, &ds, &opts)
        } else {
            let x = Qkv {
                q: slice(&q),
                k: slice(&k),
                v: slice(&v),
            };
            let (o, s, z) = (slice_mut(&mut o), slice_mut(&mut s), slice_mut(&mut z));
            decode_step::<_, bf16, _, _, _, _>(&*g, x, o, s, z, &ds, &opts)
        }
        .unwrap_or_else(|e| panic!("decode path {path}: {e}"));
        steps.push((bits(&dev, &o), bits(&dev, &s), bits(&dev, &z)));
    }
    assert_eq!(steps[0], steps[1], "decode: cudarc-typed vs Device");

    let rows = RowsShape::contiguous(37, 100);
    let x = random::<bf16>(&dev, &mut rng, 37 * 100);
    let mut y0 = nan::<bf16>(&dev, 37 * 100);
    let mut y1 = nan::<bf16>(&dev, 37 * 100);
    let map = linattn_kernels::FeatureMap::EluPlusOne;
    feature_map(&dev, &x, &mut y0, &rows, map).unwrap();
    feature_map::<_, bf16, _, _>(&*g, slice(&x), slice_mut(&mut y1), &rows, map).unwrap();
    assert_eq!(
        bits(&dev, &y0),
        bits(&dev, &y1),
        "feature map: cudarc-typed vs Device"
    );
}

/// One causal bf16 forward of `[1, heads, n, d]` on `dev` (walk schedule),
/// its output, and its rel. L2 error against the f64 reference.
fn walk_bf16(dev: &Device, heads: usize, n: usize, d: usize, seed: u64) -> (Vec<u64>, f64) {
    let mut rng = Rng::new(seed);
    let shape = AttentionShape::bhnd(1, heads, n, d, d);
    let len = heads * n * d;
    let host: Vec<Vec<bf16>> = (0..3)
        .map(|_| {
            rng.normal_vec(len)
                .iter()
                .map(|&v| bf16::from_f64(v))
                .collect()
        })
        .collect();
    let up = |x: &Vec<bf16>| dev.upload(x).unwrap();
    let (q, k, v) = (up(&host[0]), up(&host[1]), up(&host[2]));
    let mut o = nan::<bf16>(dev, len);
    let opts = AttentionOptions {
        schedule: ScheduleChoice::Walk,
        ..AttentionOptions::default()
    };
    forward(
        Kind::Causal,
        dev,
        Qkv {
            q: &q,
            k: &k,
            v: &v,
        },
        &mut o,
        &shape,
        None,
        &opts,
        StateIo::none(),
    )
    .unwrap();
    let got: Vec<f64> = dev
        .download(&o)
        .unwrap()
        .iter()
        .map(|x| x.to_f64())
        .collect();
    let f64s = |x: &Vec<bf16>| x.iter().map(|v| v.to_f64()).collect::<Vec<f64>>();
    let lay = linattn_reference::Layout {
        batch: 1,
        heads,
        tokens: n,
        dim: d,
        batch_stride: heads * n * d,
        token_stride: d,
        head_stride: n * d,
    };
    let (q64, k64, v64) = (f64s(&host[0]), f64s(&host[1]), f64s(&host[2]));
    let view = |x| linattn_reference::View::new(x, lay).unwrap();
    let ropts = linattn_reference::LinearAttentionOptions {
        feature_map: linattn_reference::FeatureMap::EluPlusOne,
        normalize: true,
        eps: opts.eps as f64,
        scale: 1.0,
    };
    let (want, _) = linattn_reference::causal_linear_attention(
        view(&q64),
        view(&k64),
        view(&v64),
        &ropts,
        None,
    )
    .unwrap();
    assert!(got.iter().all(|x| x.is_finite()), "non-finite output");
    let err = rel_l2_error(&got, want.data());
    (got.iter().map(|x| x.to_bits()).collect(), err)
}

/// Two threads share one `Gpu` and launch the same kernel
/// (`forward_bf16`) with different dynamic shared memory (D = M =
/// 128: 98,176 B; 64: 72,256 B; both past the 48 KiB default), alternating
/// for many rounds. The old executor set the kernel's shared-memory
/// attribute to each launch's own size on every launch, so one thread's
/// set could land between the other's set and launch:
/// CUDA_ERROR_INVALID_VALUE. Every run must succeed and give the bits of
/// a single-threaded run (checked once against the f64 reference).
#[test]
fn threads_sharing_a_gpu_with_different_shared_sizes() {
    use linattn_kernels::ops::tuning::forward::{tiling, walk_shared_bytes};
    use linattn_kernels::DType;
    let Some(g) = gpu() else { return };
    let dev = Device::Gpu(g);
    let bytes = |d| {
        let t = tiling(DType::Bf16, d, d);
        walk_shared_bytes(DType::Bf16, d, t.chunk, t.m_tile)
    };
    assert!(bytes(128) > 48 * 1024 && bytes(64) > 48 * 1024 && bytes(128) != bytes(64));
    let seed = test_seed();
    let cases = [(2usize, 256usize, 128usize), (3, 320, 64)];
    let want: Vec<Vec<u64>> = cases
        .iter()
        .map(|&(h, n, d)| {
            let (bits, err) = walk_bf16(&dev, h, n, d, seed ^ d as u64);
            assert!(
                err < 1e-2,
                "d {d}: rel L2 error {err:e} against the reference"
            );
            eprintln!("d {d}: rel L2 error {err:e}");
            bits
        })
        .collect();
    std::thread::scope(|scope| {
        for (i, &(h, n, d)) in cases.iter().enumerate() {
            let (dev, want) = (&dev, &want[i]);
            scope.spawn(move || {
                for round in 0..40 {
                    let (bits, _) = walk_bf16(dev, h, n, d, seed ^ d as u64);
                    assert!(
                        bits == *want,
                        "d {d}, round {round}: bits differ from the single-threaded run"
                    );
                }
            });
        }
    });
}

/// Empty buffers on the GPU: upload and download of nothing, zeros of
/// length 0, and a feature map over an empty view (no cuMemAlloc(0)).
#[test]
fn empty_buffers_on_the_gpu() {
    let Some(g) = gpu() else { return };
    let dev = Device::Gpu(g);
    let e = dev.upload::<bf16>(&[]).unwrap();
    assert!(e.is_empty());
    assert!(dev.download(&e).unwrap().is_empty());
    let mut z = dev.alloc_zeros::<bf16>(0).unwrap();
    feature_map(
        &dev,
        &e,
        &mut z,
        &RowsShape::contiguous(0, 16),
        linattn_kernels::FeatureMap::Relu,
    )
    .unwrap();
    let z = dev.alloc_zeros::<f32>(3).unwrap();
    assert_eq!(dev.download(&z).unwrap(), vec![0f32; 3]);
    dev.synchronize().unwrap();
}

/// The GPU reports its own target: a supported capability, its SMs, and
/// the per-block opt-in the 99 KiB tiling needs. With
/// the sync switch on (`with_sync_launches`, as `LINATTN_SYNC_LAUNCHES=1`)
/// a `Gpu` synchronises after each launch and still computes the same bits.
#[test]
fn gpu_target_and_sync_launches() {
    let Some(g) = gpu() else { return };
    let t = g.target();
    eprintln!("{} {t:?}", g.info().name);
    assert!(t.compute_capability >= (8, 0), "{t:?}");
    assert!(t.sms > 0 && t.shared_per_block_optin >= 99 * 1024, "{t:?}");
    assert_eq!(Device::Gpu(g.clone()).target(), t);
    let dev = Device::Gpu(g);
    let (plain, _) = walk_bf16(&dev, 1, 96, 64, 5);
    // Not through the environment: setenv while other test threads are in
    // the driver (which reads it with getenv) can crash the binary.
    let synced = Gpu::new(0).unwrap().with_sync_launches(true);
    assert!(synced.syncs_launches());
    let (bits, _) = walk_bf16(&Device::Gpu(Arc::new(synced)), 1, 96, 64, 5);
    assert!(bits == plain, "synchronised launches changed the result");
}
