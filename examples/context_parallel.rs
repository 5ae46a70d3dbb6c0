//! Context parallelism on the CPU: a packed batch of three sequences cut
//! into R = 3 pieces (one sequence crosses both cuts, one lies inside a
//! piece), each piece on its own emulated device in its own thread, states
//! exchanged by `InProcess` (the NCCL collective has the same interface).
//! Prints the largest relative error of every result against one device
//! running the whole batch (see docs/context-parallel.md).
//!
//! ```text
//! cargo run --example context_parallel
//! ```

use std::sync::Arc;

use linattn_kernels::{
    backward, forward, piece_offsets, AttentionOptions, AttentionShape, BackwardInputs,
    BackwardStates, Buffer, ContextParallel, Device, Emulator, Grads, InProcess, Kind, PieceInputs,
    Qkv, StateIo, StateMut,
};
use linattn_reference::testing::{rel_l2_error, Rng};

const H: usize = 2;
const D: usize = 8;
const M: usize = 8;
/// Three sequences: 70, 20 and 50 tokens.
const CU: [usize; 4] = [0, 70, 90, 140];
/// Rank r holds tokens CUTS[r]..CUTS[r + 1].
const CUTS: [usize; 4] = [0, 40, 100, 140];

type Results = [Vec<f32>; 5];

fn emulator() -> Device {
    Device::Emulator(Arc::new(Emulator::new().expect("the emulator is built in")))
}

/// o, dq, dk, dv and the final state of one device running everything.
fn single(
    kind: Kind,
    x: &[Vec<f32>; 4],
    opts: &AttentionOptions,
) -> linattn_kernels::Result<Results> {
    let dev = emulator();
    let t = CU[3];
    let shape = AttentionShape::packed(t, H, D, M);
    let [q, k, v, d_o] = x.each_ref().map(|a| dev.upload(a).unwrap());
    let mut o = dev.alloc_zeros::<f32>(t * H * M)?;
    let (mut fs, mut fz) = (dev.alloc_zeros(3 * H * D * M)?, dev.alloc_zeros(3 * H * D)?);
    let qkv = Qkv {
        q: &q,
        k: &k,
        v: &v,
    };
    let st: StateIo<'_, Buffer<f32>, _> = StateIo {
        initial: None,
        final_state: Some(StateMut {
            s: &mut fs,
            z: &mut fz,
        }),
    };
    forward(kind, &dev, qkv, &mut o, &shape, Some(&CU), opts, st)?;
    let mut g: [Buffer<f32>; 3] = [D, D, M].map(|w| dev.alloc_zeros(t * H * w).unwrap());
    let [dq, dk, dv] = &mut g;
    let bi = BackwardInputs {
        q: &q,
        k: &k,
        v: &v,
        d_o: &d_o,
    };
    let gr = Grads { dq, dk, dv };
    backward(
        kind,
        &dev,
        bi,
        gr,
        &shape,
        Some(&CU),
        opts,
        BackwardStates::none(),
    )?;
    let mut fin = dev.download(&fs)?;
    fin.extend(dev.download(&fz)?);
    Ok([
        dev.download(&o)?,
        dev.download(&g[0])?,
        dev.download(&g[1])?,
        dev.download(&g[2])?,
        fin,
    ])
}

/// One rank: its piece's o, dq, dk, dv and the final state.
fn rank(
    comm: InProcess,
    kind: Kind,
    x: &[Vec<f32>; 4],
    opts: &AttentionOptions,
) -> linattn_kernels::Result<Results> {
    let dev = emulator();
    let r = linattn_kernels::Collective::rank(&comm);
    let (a, b) = (CUTS[r], CUTS[r + 1]);
    let n = b - a;
    let shape = AttentionShape::packed(n, H, D, M);
    let cu = piece_offsets(&CU, a, b)?;
    let widths = [D, D, M, M];
    let [q, k, v, d_o] = [0, 1, 2, 3].map(|i| {
        let w = widths[i] * H;
        dev.upload(&x[i][a * w..b * w]).unwrap()
    });
    let cp = ContextParallel::new(comm)?;
    let piece = PieceInputs {
        q: &q,
        k: &k,
        v: &v,
        shape: &shape,
        cu_seqlens: Some(&cu),
    };
    let mut o = dev.alloc_zeros::<f32>(n * H * M)?;
    let mut fin = dev.alloc_zeros::<f32>(3 * H * (D * M + D))?;
    let start = cp.forward(&dev, kind, piece, &mut o, opts, None, Some(&mut fin))?;
    let mut g: [Buffer<f32>; 3] = [D, D, M].map(|w| dev.alloc_zeros(n * H * w).unwrap());
    let [dq, dk, dv] = &mut g;
    cp.backward(
        &dev,
        kind,
        piece,
        &d_o,
        Grads { dq, dk, dv },
        opts,
        &start,
        None,
        None,
    )?;
    Ok([
        dev.download(&o)?,
        dev.download(&g[0])?,
        dev.download(&g[1])?,
        dev.download(&g[2])?,
        dev.download(&fin)?,
    ])
}

fn main() -> linattn_kernels::Result<()> {
    let mut rng = Rng::new(15);
    let t = CU[3];
    let mut draw = |w: usize, mean: f64| -> Vec<f32> {
        (0..t * H * w)
            .map(|_| (mean + rng.normal()) as f32)
            .collect()
    };
    let x = [draw(D, 5.0), draw(D, 5.0), draw(M, 0.0), draw(M, 0.0)];
    let opts = AttentionOptions {
        scale: 0.2,
        ..Default::default()
    };
    println!(
        "{} ranks, pieces {:?} of a packed batch with offsets {CU:?}, H = {H}, D = {D}, M = {M}",
        CUTS.len() - 1,
        CUTS.windows(2).map(|w| w[0]..w[1]).collect::<Vec<_>>()
    );
    let mut worst = 0f64;
    for kind in [Kind::Causal, Kind::NonCausal] {
        let want = single(kind, &x, &opts)?;
        let comms = InProcess::group(CUTS.len() - 1)?;
        let pieces: Vec<Results> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|c| s.spawn(|| rank(c, kind, &x, &opts)))
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("rank thread"))
                .collect::<Vec<_>>()
        })
        .into_iter()
        .collect::<linattn_kernels::Result<_>>()?;
        let wide = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
        print!("{kind:?}:");
        for (i, name) in ["o", "dq", "dk", "dv"].iter().enumerate() {
            let got: Vec<f32> = pieces.iter().flat_map(|p| p[i].iter().copied()).collect();
            let e = rel_l2_error(&wide(&got), &wide(&want[i]));
            worst = worst.max(e);
            print!(" {name} {e:.1e}");
        }
        let e = rel_l2_error(&wide(&pieces[2][4]), &wide(&want[4]));
        worst = worst.max(e);
        println!(" final state {e:.1e} (relative L2 vs one device)");
    }
    println!("pieces agree with one device: max relative error {worst:.1e}");
    assert!(
        worst < 1e-5,
        "context-parallel results differ from one device"
    );
    Ok(())
}
