//! The NCCL collective (feature `nccl`): context parallelism on real GPUs,
//! one rank on one GPU, and R ranks when R GPUs are present, against one
//! GPU running the whole packed batch. Skipped (with the reason printed)
//! without a GPU, built kernels or libnccl; on a machine without NCCL the
//! constructors must return an error rather than panic.
//!
//! `cargo test -p linattn-kernels --features nccl --test nccl`
#![cfg(feature = "nccl")]

use std::sync::Arc;

use linattn_kernels::{
    backward, forward, piece_offsets, AttentionOptions, AttentionShape, BackwardInputs,
    BackwardStates, Buffer, BuildStatus, Collective, ContextParallel, Device, Error, Gpu, Grads,
    Kind, NcclCollective, PieceInputs, Qkv, StateIo, StateMut,
};
use linattn_reference::testing::{rel_l2_error, Rng};

const H: usize = 2;
const D: usize = 16;
const M: usize = 16;
const CU: [usize; 4] = [0, 300, 340, 700];

fn gpus_or_skip() -> Option<usize> {
    if let BuildStatus::NotBuilt(why) = linattn_kernels::build_status() {
        eprintln!("kernels not built ({why}): skipped");
        return None;
    }
    let n = linattn_kernels::device_count().unwrap_or(0);
    if n == 0 {
        eprintln!("no GPU: skipped");
        return None;
    }
    if !NcclCollective::available() {
        eprintln!("libnccl not found: skipped");
        return None;
    }
    Some(n)
}

type Out = Vec<Vec<f32>>;

fn inputs() -> [Vec<f32>; 4] {
    let mut rng = Rng::new(15);
    let t = CU[3];
    let mut draw = |w: usize, mean: f64| -> Vec<f32> {
        (0..t * H * w)
            .map(|_| (mean + rng.normal()) as f32)
            .collect()
    };
    [draw(D, 10.0), draw(D, 10.0), draw(M, 0.0), draw(M, 0.0)]
}

fn opts() -> AttentionOptions {
    AttentionOptions {
        scale: 0.1,
        ..Default::default()
    }
}

fn single(dev: &Device, kind: Kind, x: &[Vec<f32>; 4]) -> Out {
    let t = CU[3];
    let shape = AttentionShape::packed(t, H, D, M);
    let [q, k, v, d_o] = x.each_ref().map(|a| dev.upload(a).unwrap());
    let mut o = dev.alloc_zeros::<f32>(t * H * M).unwrap();
    let (mut fs, mut fz) = (
        dev.alloc_zeros(3 * H * D * M).unwrap(),
        dev.alloc_zeros(3 * H * D).unwrap(),
    );
    let st: StateIo<'_, Buffer<f32>, _> = StateIo {
        initial: None,
        final_state: Some(StateMut {
            s: &mut fs,
            z: &mut fz,
        }),
    };
    let qkv = Qkv {
        q: &q,
        k: &k,
        v: &v,
    };
    let o_ = &opts();
    forward(kind, dev, qkv, &mut o, &shape, Some(&CU), o_, st).unwrap();
    let mut g: [Buffer<f32>; 3] = [D, D, M].map(|w| dev.alloc_zeros(t * H * w).unwrap());
    let [dq, dk, dv] = &mut g;
    let bi = BackwardInputs {
        q: &q,
        k: &k,
        v: &v,
        d_o: &d_o,
    };
    let gr = Grads { dq, dk, dv };
    let bs = BackwardStates::none();
    backward(kind, dev, bi, gr, &shape, Some(&CU), o_, bs).unwrap();
    let mut fin = dev.download(&fs).unwrap();
    fin.extend(dev.download(&fz).unwrap());
    let mut out = vec![dev.download(&o).unwrap()];
    out.extend(g.iter().map(|b| dev.download(b).unwrap()));
    out.push(fin);
    out
}

fn rank(dev: &Device, comm: NcclCollective, kind: Kind, cuts: &[usize], x: &[Vec<f32>; 4]) -> Out {
    let r = comm.rank();
    let (a, b) = (cuts[r], cuts[r + 1]);
    let n = b - a;
    let shape = AttentionShape::packed(n, H, D, M);
    let cu = piece_offsets(&CU, a, b).unwrap();
    let widths = [D, D, M, M];
    let [q, k, v, d_o] = [0, 1, 2, 3].map(|i| {
        let w = widths[i] * H;
        dev.upload(&x[i][a * w..b * w]).unwrap()
    });
    let cp = ContextParallel::new(comm).unwrap();
    let piece = PieceInputs {
        q: &q,
        k: &k,
        v: &v,
        shape: &shape,
        cu_seqlens: Some(&cu),
    };
    let mut o = dev.alloc_zeros::<f32>(n * H * M).unwrap();
    let mut fin = dev.alloc_zeros::<f32>(3 * H * (D * M + D)).unwrap();
    let start = cp
        .forward(dev, kind, piece, &mut o, &opts(), None, Some(&mut fin))
        .unwrap();
    let mut g: [Buffer<f32>; 3] = [D, D, M].map(|w| dev.alloc_zeros(n * H * w).unwrap());
    let [dq, dk, dv] = &mut g;
    cp.backward(
        dev,
        kind,
        piece,
        &d_o,
        Grads { dq, dk, dv },
        &opts(),
        &start,
        None,
        None,
    )
    .unwrap();
    let mut out = vec![dev.download(&o).unwrap()];
    out.extend(g.iter().map(|b| dev.download(b).unwrap()));
    out.push(dev.download(&fin).unwrap());
    out
}

#[test]
fn nccl_ranks_agree_with_one_gpu() {
    let Some(n) = gpus_or_skip() else { return };
    let x = inputs();
    let mut counts = vec![1];
    if n > 1 {
        counts.push(n);
    }
    for ranks in counts {
        let gpus: Vec<Arc<Gpu>> = (0..ranks).map(|i| Arc::new(Gpu::new(i).unwrap())).collect();
        let total = CU[3];
        let cuts: Vec<usize> = (0..=ranks).map(|r| r * total / ranks).collect();
        for kind in [Kind::Causal, Kind::NonCausal] {
            let want = single(&Device::Gpu(gpus[0].clone()), kind, &x);
            let comms = NcclCollective::for_gpus(&gpus).unwrap();
            let outs: Vec<Out> = std::thread::scope(|s| {
                let hs: Vec<_> = comms
                    .into_iter()
                    .zip(&gpus)
                    .map(|(c, g)| {
                        let (cuts, x) = (&cuts, &x);
                        s.spawn(move || rank(&Device::Gpu(g.clone()), c, kind, cuts, x))
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (i, name) in ["o", "dq", "dk", "dv", "final"].iter().enumerate() {
                let got: Vec<f64> = if i == 4 {
                    outs[0][4].iter().map(|&a| a as f64).collect()
                } else {
                    outs.iter()
                        .flat_map(|o| o[i].iter().map(|&a| a as f64))
                        .collect()
                };
                let w: Vec<f64> = want[i].iter().map(|&a| a as f64).collect();
                assert!(got.iter().all(|a| a.is_finite()), "{name}: not finite");
                let e = rel_l2_error(&got, &w);
                println!("{ranks} GPU rank(s), {kind:?}, {name}: rel L2 {e:.2e}");
                assert!(e < 1e-5, "{ranks} ranks {kind:?} {name}: rel L2 {e:.2e}");
            }
        }
    }
}

/// Without libnccl the constructors return a typed error (no panic).
#[test]
fn missing_nccl_is_an_error() {
    if NcclCollective::available() {
        eprintln!("libnccl present: nothing to check");
        return;
    }
    match NcclCollective::unique_id() {
        Err(Error::InvalidArgument { arg, .. }) => assert_eq!(arg, "libnccl"),
        other => panic!(
            "expected an error naming libnccl, got {:?}",
            other.map(|_| ())
        ),
    }
}
