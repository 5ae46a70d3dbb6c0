//! On a GPU, the cudarc-typed (`*_cuda`) and raw-address (`*_raw`) entry
//! points give the same bits as the [`Device`] entry points (all three build
//! the same plan; this checks the glue: pointers, strides, workspace,
//! offsets, states). Forward (varlen, final state), backward (whole-head
//! walks, initial state, d_initial), decode and the feature map.
//!
//! GPU only: without one it says so and checks nothing here. On every
//! machine the raw entry points run through the emulator in
//! `tests/index64.rs`, and the `Device` ones everywhere else.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr};
use half::bf16;
use linattn_kernels::ops::backward::{
    self, causal_backward, causal_backward_cuda, BackwardInputs, BackwardStates, Grads, RawBackward,
};
use linattn_kernels::ops::decode::{decode_step, decode_step_cuda, DecodeShape};
use linattn_kernels::ops::feature_map::{feature_map, feature_map_cuda, RowsShape};
use linattn_kernels::ops::forward::{
    self, causal_forward, causal_forward_cuda, AttentionOptions, AttentionShape, Lens, Qkv,
    RawForward, ScheduleChoice, StateIo, StateMut, StateRef,
};
use linattn_kernels::{Buffer, BuildStatus, Device, Element, Gpu};
use linattn_reference::testing::{test_seed, Rng};

fn gpu() -> Option<Arc<Gpu>> {
    match (Gpu::new(0), linattn_kernels::build_status()) {
        (Ok(g), BuildStatus::Built { .. }) => Some(Arc::new(g)),
        (Ok(_), BuildStatus::NotBuilt(why)) => {
            eprintln!("GPU present but kernels not built ({why}): GPU skipped");
            None
        }
        (Err(e), _) => {
            eprintln!("GPU skipped: {e}");
            None
        }
    }
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
            0 => causal_forward(
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
                StateIo {
                    initial: None,
                    final_state: Some(StateMut {
                        s: &mut fs,
                        z: &mut fz,
                    }),
                },
            ),
            1 => causal_forward_cuda::<bf16, _, CudaSlice<f32>, _>(
                &g,
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
                let ws_len = forward::workspace_len(forward::Kind::Causal, &problem, &opts);
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
                    forward::causal_forward_raw(&*g, bf16::DTYPE, &ptrs, &shape, Some(&cu), &opts)
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
                0 => causal_backward(
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
                1 => causal_backward_cuda::<bf16, _, _, _, _>(
                    &g,
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
                        backward::causal_backward_raw(&*g, bf16::DTYPE, &ptrs, &shape, None, &opts)
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
            decode_step_cuda::<bf16, _>(&g, x, o, s, z, &ds, &opts)
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
    feature_map_cuda::<bf16>(&g, slice(&x), slice_mut(&mut y1), &rows, map).unwrap();
    assert_eq!(
        bits(&dev, &y0),
        bits(&dev, &y1),
        "feature map: cudarc-typed vs Device"
    );
}
