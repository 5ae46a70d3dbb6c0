//! Unit tests of the forward's tiling, schedule policy, validation and
//! plans (no GPU), and of its entry points on the emulator.

use super::plan::*;
use super::tiling::*;
use super::*;
use crate::dtype::DType;
use crate::ops::attention::*;
use crate::params::LinattnStateStore;
use crate::target::Target;
use crate::Device;

const H200: Target = Target::H200;

fn lens_for(shape: &AttentionShape) -> Lens {
    Lens {
        q: shape.span(&shape.q, shape.d).unwrap(),
        k: shape.span(&shape.k, shape.d).unwrap(),
        v: shape.span(&shape.v, shape.m).unwrap(),
        o: shape.span(&shape.o, shape.m).unwrap(),
        initial: None,
        final_state: None,
    }
}

/// The problem of a call with full-length buffers, planned for an H200.
fn problem(dtype: DType, shape: &AttentionShape, opts: &AttentionOptions) -> Problem {
    validate("t", dtype, shape, None, opts, &lens_for(shape), &H200).unwrap()
}

#[test]
fn tiling_fits_shared_memory_for_every_size() {
    for d in 1..=MAX_DIM {
        for m in [1, 2, 17, 31, 64, 100, 128, 255, 256] {
            for dtype in [DType::F16, DType::Bf16] {
                let t = tiling(dtype, d, m);
                let bytes = walk_shared_bytes(dtype, d, t.chunk, t.m_tile);
                assert!(bytes <= SHARED_BUDGET_BYTES, "d {d} m {m}: {t:?}");
                assert_eq!(t.m_tile % 16, 0, "d {d} m {m}: {t:?}");
                assert_eq!(t.chunk % 16, 0, "d {d} m {m}: {t:?}");
                assert!(t.m_tile <= m.next_multiple_of(16));
                assert_eq!(t.m_tiles, m.div_ceil(t.m_tile), "d {d} m {m}");
                assert!((t.m_tiles - 1) * t.m_tile < m);
                // Within the kernel's per-warp fragment arrays.
                let frags = |rows: usize| (rows / 16) * (t.m_tile / 16);
                assert!(
                    frags(d.next_multiple_of(16)) <= MMA_STATE_FRAGS * WARPS,
                    "{t:?}"
                );
                assert!(frags(t.chunk) <= MMA_OUT_FRAGS * WARPS, "{t:?}");
            }
            let t = tiling(DType::F32, d, m);
            let bytes = walk_shared_bytes(DType::F32, d, t.chunk, t.m_tile);
            assert!(
                bytes <= SHARED_BUDGET_BYTES,
                "d {d} m {m}: {t:?} needs {bytes}"
            );
            assert!(t.m_tile >= 1 && t.m_tile <= m);
            assert_eq!(t.m_tiles, m.div_ceil(t.m_tile), "d {d} m {m}");
            // Tiles are balanced: the last one is not nearly empty.
            assert!(m - (t.m_tiles - 1) * t.m_tile >= 1);
            assert!((t.m_tiles - 1) * t.m_tile < m);
        }
    }
    assert_eq!(tiling(DType::F32, 16, 16).chunk, 64);
    assert_eq!(tiling(DType::F32, 64, 64).m_tiles, 1);
}

#[test]
fn tensor_core_policy() {
    assert!(uses_mma(DType::F16) && uses_mma(DType::Bf16));
    assert!(!uses_mma(DType::F32));
    // The first anchor shape (D = M = 128): chunk 64, two 64-column
    // value tiles (the state fragments cap D * MT at 8192).
    for dtype in [DType::F16, DType::Bf16] {
        let t = tiling(dtype, 128, 128);
        assert_eq!((t.chunk, t.m_tile, t.m_tiles), (64, 64, 2));
        // D = M = 64: one value tile, chunk 64.
        let t = tiling(dtype, 64, 64);
        assert_eq!((t.chunk, t.m_tile, t.m_tiles), (64, 64, 1));
        // D not a multiple of 16 is padded, not sent to the fp32 walk.
        let t = tiling(dtype, 17, 5);
        assert_eq!((t.chunk, t.m_tile, t.m_tiles), (64, 16, 1));
    }
    // Sizes outside 1..=256 (rejected by validation) never panic here.
    for (d, m) in [(0, 0), (0, 7), (300, 5), (5, 1000), (usize::MAX / 4, 1)] {
        for dtype in [DType::F32, DType::F16, DType::Bf16] {
            let t = tiling(dtype, d, m);
            assert!(t.chunk >= 8 && t.m_tile >= 1 && t.m_tiles >= 1, "{t:?}");
        }
    }
    // The layout the kernel carves at D = M = 128, chunk 64, tile 64.
    let halves = 2 * 64 * 136 + 64 * 72 + 128 * 72 + 64 * 72;
    let floats = 64 * 68 + 8 * 256 + 128 + 64 + 8 * 4;
    assert_eq!(
        walk_shared_bytes(DType::Bf16, 128, 64, 64),
        halves * 2 + floats * 4
    );
}

#[test]
fn policy_walks_when_the_gpu_is_full_and_splits_when_not() {
    let t = tiling(DType::F32, 128, 128);
    let resident = H200.resident_blocks(&walk_footprint(DType::F32, 128, &t));
    assert!(resident >= 132, "{resident}");
    // Many seq-heads: walk.
    let s = schedule(ScheduleChoice::Auto, 1024, &t, 8192, resident);
    assert_eq!(s.parts, 1);
    assert!(s.part_len >= 8192);
    // One seq-head, long sequence: split to fill the GPU.
    let s = schedule(ScheduleChoice::Auto, 1, &t, 8192, resident);
    assert!(s.parts > 1);
    assert!(s.parts * s.part_len >= 8192 && (s.parts - 1) * s.part_len < 8192);
    assert_eq!(s.part_len % t.chunk, 0);
    assert!(s.part_len >= 2 * t.chunk);
    // Short sequences never split.
    let auto = |sh, n| schedule(ScheduleChoice::Auto, sh, &t, n, resident).parts;
    assert_eq!(auto(1, 2 * t.chunk), 1);
    assert_eq!(auto(1, 3 * t.chunk), 1);
    assert_eq!(auto(1, 0), 1);
    // A GPU reporting nothing resident never splits (and never divides by 0).
    assert_eq!(schedule(ScheduleChoice::Auto, 0, &t, 8192, 0).parts, 1);
    // Forced choices; partitions are capped by the chunks there are.
    assert_eq!(
        schedule(ScheduleChoice::Walk, 1, &t, 8192, resident).parts,
        1
    );
    let s = schedule(ScheduleChoice::Split { parts: 3 }, 1, &t, 5 * t.chunk, 0);
    assert_eq!((s.parts, s.part_len), (3, 2 * t.chunk));
    let s = schedule(ScheduleChoice::Split { parts: 100 }, 4, &t, 3, resident);
    assert_eq!((s.parts, s.part_len), (1, t.chunk));
    // Partitions exactly cover every length.
    for n in 1..300 {
        for parts in 1..6 {
            let s = schedule(ScheduleChoice::Split { parts }, 1, &t, n, resident);
            assert!(s.parts * s.part_len >= n && (s.parts - 1) * s.part_len < n);
            assert!(s.parts <= parts);
        }
    }
}

/// The policy per architecture at bf16 D = M = 128 (98,176 B per walk
/// block, two value tiles): sm_90 holds two blocks per SM, sm_80 and
/// sm_86/89 one, and the decisions follow the SM counts.
#[test]
fn policy_per_architecture() {
    let t = tiling(DType::Bf16, 128, 128);
    assert_eq!((t.chunk, t.m_tiles), (64, 2));
    let fp = walk_footprint(DType::Bf16, 128, &t);
    assert_eq!(fp.shared_bytes, 98_176);
    let a100 = Target::A100;
    let sm86 = Target::sm86(84);
    let sm89 = Target::sm89(142);
    let per_sm: Vec<u32> = [H200, a100, sm86, sm89]
        .iter()
        .map(|g| g.blocks_per_sm(&fp))
        .collect();
    assert_eq!(per_sm, [2, 1, 1, 1]);
    let auto = |g: &Target, sh: usize, n: usize| {
        schedule(ScheduleChoice::Auto, sh, &t, n, g.resident_blocks(&fp)).parts
    };
    // First anchor, B1 T8192 H96: 192 blocks. H200: 264 resident, a
    // split would spill into a second wave: walk. A100 (108), sm_86
    // (84): two or three waves already: walk.
    for g in [&H200, &a100, &sm86, &sm89] {
        assert_eq!(auto(g, 96, 8192), 1, "{}", g.arch());
    }
    // 66 seq-heads = 132 blocks: half the H200's slots, split in two;
    // the A100 is already full.
    assert_eq!(auto(&H200, 66, 8192), 2);
    assert_eq!(auto(&a100, 66, 8192), 1);
    assert_eq!(auto(&sm86, 66, 8192), 1);
    // 67 seq-heads (134 blocks): past half of 264, walk.
    assert_eq!(auto(&H200, 67, 8192), 1);
    // B1 H1 T8192: 2 blocks, 128 chunks. H200 and sm_89 (142 SMs):
    // capped at 64 partitions of two chunks. A100: 54 asked, whole
    // chunks per partition make it 43 of three; sm_86: 42 asked, 32 of
    // four.
    assert_eq!(auto(&H200, 1, 8192), 64);
    assert_eq!(auto(&a100, 1, 8192), 43);
    assert_eq!(auto(&sm86, 1, 8192), 32);
    assert_eq!(auto(&sm89, 1, 8192), 64);
    // 16 seq-heads (32 blocks): 264 / 32 = 8 on the H200, 108 / 32 = 3
    // on the A100 (one wave of 96, not two waves of 128), 2 on sm_86.
    assert_eq!(auto(&H200, 16, 8192), 8);
    assert_eq!(auto(&a100, 16, 8192), 3);
    assert_eq!(auto(&sm86, 16, 8192), 2);
    // Whatever the partitions, the grid stays within one wave.
    for g in [&H200, &a100, &sm86, &sm89] {
        for sh in 1..200 {
            let p = auto(g, sh, 1 << 16);
            if p > 1 {
                assert!(sh * 2 * p <= g.resident_blocks(&fp), "{} {sh}", g.arch());
            }
        }
    }
}

/// The footprint the policy assumes is the one the `.cu` files declare.
#[test]
fn walk_launch_bounds_match_the_sources() {
    let (threads, min_blocks) = WALK_LAUNCH_BOUNDS;
    let bounds = format!("__launch_bounds__({threads}, {min_blocks})");
    let src = include_str!("../../../../../cuda/forward.cu");
    for dtype in [DType::F32, DType::F16, DType::Bf16] {
        for tiles in [F16Tiles::F16, F16Tiles::Bf16] {
            let decl = format!("{bounds} {}(", kernel_name(dtype, tiles));
            assert!(src.contains(&decl), "missing `{decl}`");
        }
    }
}

#[test]
fn plans_have_the_expected_launches() {
    let shape = AttentionShape::bhnd(1, 2, 300, 32, 48);
    let mut opts = AttentionOptions::default();
    let p = problem(DType::F32, &shape, &opts);
    let ptrs = RawForward {
        q: 16,
        k: 32,
        v: 48,
        o: 64,
        final_s: 128,
        final_z: 256,
        workspace: 4096,
        ..Default::default()
    };
    opts.schedule = ScheduleChoice::Walk;
    let w = plan(Kind::Causal, DType::F16, &p, &opts, &ptrs);
    assert_eq!(w.launches.len(), 1);
    assert_eq!(workspace_len(Kind::Causal, &p, &opts), 0);
    let Launch::Walk(l) = w.launches[0] else {
        panic!()
    };
    assert_eq!(l.kernel, "forward_f16");
    assert_eq!(l.grid, [2 * p.tiling.m_tiles as u32, 1, 1]);
    assert_eq!(
        l.params.state_store,
        LinattnStateStore::LINATTN_STORE_FINAL as i32
    );
    assert!(l.shared_bytes as usize <= SHARED_BUDGET_BYTES);
    opts.schedule = ScheduleChoice::Split { parts: 3 };
    let s = plan(Kind::Causal, DType::F16, &p, &opts, &ptrs);
    assert_eq!(s.launches.len(), 3);
    let ws = workspace_len(Kind::Causal, &p, &opts);
    assert_eq!(ws, 2 * 3 * (32 * 48 + 32));
    let Launch::Walk(l) = s.launches[2] else {
        panic!()
    };
    assert_eq!(l.grid[1], 3);
    assert_eq!(l.params.work_z, 4096 + 2 * 3 * 32 * 48 * 4);
    let n = plan(Kind::NonCausal, DType::F32, &p, &opts, &ptrs);
    assert_eq!(n.launches.len(), 3);
    let Launch::Walk(l) = n.launches[2] else {
        panic!()
    };
    assert_eq!((l.params.causal, l.kernel), (0, "forward_f32"));
    // One partition, no states: the combine is skipped.
    opts.schedule = ScheduleChoice::Walk;
    let bare = RawForward {
        final_s: 0,
        final_z: 0,
        ..ptrs
    };
    assert_eq!(
        plan(Kind::NonCausal, DType::F32, &p, &opts, &bare)
            .launches
            .len(),
        2
    );
}

#[test]
fn validation_rejects_bad_calls() {
    let shape = AttentionShape::bnhd(2, 3, 10, 17, 5);
    let opts = AttentionOptions::default();
    let lens = lens_for(&shape);
    assert!(validate("t", DType::F32, &shape, None, &opts, &lens, &H200).is_ok());
    let err = |s: &AttentionShape, cu: Option<&[usize]>, o: &AttentionOptions, l: &Lens| {
        validate("t", DType::F32, s, cu, o, l, &H200)
            .unwrap_err()
            .to_string()
    };
    let e = err(
        &shape,
        None,
        &opts,
        &Lens {
            q: lens.q - 1,
            ..lens
        },
    );
    assert!(e.contains("`q`") && e.contains("need"), "{e}");
    let e = err(&AttentionShape { d: 257, ..shape }, None, &opts, &lens);
    assert!(e.contains("1..=256"), "{e}");
    let e = err(&AttentionShape { m: 0, ..shape }, None, &opts, &lens);
    assert!(e.contains("`m`"), "{e}");
    let mut bad_o = shape;
    bad_o.o.token = 2;
    let e = err(&bad_o, None, &opts, &lens);
    assert!(e.contains("overlap"), "{e}");
    let e = err(&shape, None, &AttentionOptions { eps: -1.0, ..opts }, &lens);
    assert!(e.contains("eps"), "{e}");
    let e = err(
        &shape,
        None,
        &opts,
        &Lens {
            initial: Some((2 * 3 * 17 * 5, 2 * 3 * 17 - 1)),
            ..lens
        },
    );
    assert!(e.contains("initial state"), "{e}");
    // Varlen: batch 1, offsets 0..=tokens, never decreasing.
    let packed = AttentionShape::packed(10, 3, 17, 5);
    let pl = lens_for(&packed);
    let p = validate(
        "t",
        DType::F32,
        &packed,
        Some(&[0, 4, 4, 10]),
        &opts,
        &pl,
        &H200,
    )
    .unwrap();
    assert_eq!((p.num_seqs, p.max_len, p.seq_heads()), (3, 6, 9));
    assert!(err(&packed, Some(&[0, 4, 3, 10]), &opts, &pl).contains("decrease"));
    assert!(err(&packed, Some(&[0, 4, 9]), &opts, &pl).contains("offsets"));
    assert!(err(&shape, Some(&[0, 10]), &opts, &lens).contains("batch must be 1"));
    // Index limits.
    let huge = AttentionShape {
        tokens: usize::MAX / 4,
        ..shape
    };
    let hl = Lens::unknown(false, false);
    assert!(err(&huge, None, &opts, &hl).contains("overflows"));
}

#[test]
fn raw_checks_catch_overlaps_and_nulls() {
    let shape = AttentionShape::bhnd(1, 1, 4, 2, 2);
    let opts = AttentionOptions {
        schedule: ScheduleChoice::Walk,
        ..Default::default()
    };
    let p = problem(DType::F32, &shape, &opts);
    let ok = RawForward {
        q: 1000,
        k: 2000,
        v: 3000,
        o: 4000,
        ..Default::default()
    };
    assert!(check_raw("t", DType::F32, &ok, &p, 0).is_ok());
    let e = check_raw("t", DType::F32, &RawForward { o: 1004, ..ok }, &p, 0).unwrap_err();
    assert!(e.to_string().contains("overlaps `q`"), "{e}");
    let e = check_raw("t", DType::F32, &RawForward { k: 0, ..ok }, &p, 0).unwrap_err();
    assert!(e.to_string().contains("null"), "{e}");
    let e = check_raw(
        "t",
        DType::F32,
        &RawForward {
            final_s: 5000,
            ..ok
        },
        &p,
        0,
    )
    .unwrap_err();
    assert!(e.to_string().contains("together"), "{e}");
    let e = check_raw("t", DType::F32, &ok, &p, 10).unwrap_err();
    assert!(e.to_string().contains("workspace"), "{e}");
    // A workspace one element short of the call's need.
    let ws = |n| RawForward {
        workspace: 9000,
        workspace_len: n,
        ..ok
    };
    assert!(check_raw("t", DType::F32, &ws(10), &p, 10).is_ok());
    let e = check_raw("t", DType::F32, &ws(9), &p, 10).unwrap_err();
    assert!(
        e.to_string()
            .contains("needs a workspace of 10 fp32 elements, 9 given"),
        "{e}"
    );
}

/// The executor's target reaches the schedule: on the emulator standing
/// in for an H200 (264 resident f32 D = M = 64 walks) 120 sequence-heads
/// split in two, standing in for an A100 (216) they walk; both match the
/// f64 reference (NaN-poisoned output, every element checked).
#[cfg(feature = "emulator")]
#[test]
fn the_executor_target_decides_the_schedule() {
    use linattn_reference::testing::{rel_l2_error, test_seed, Rng};
    use std::sync::Arc;
    let (h, n, d) = (120, 256, 64);
    let shape = AttentionShape::bhnd(1, h, n, d, d);
    let opts = AttentionOptions::default();
    let mut rng = Rng::new(test_seed());
    let host: Vec<Vec<f32>> = (0..3)
        .map(|_| {
            rng.normal_vec(h * n * d)
                .iter()
                .map(|&x| x as f32)
                .collect()
        })
        .collect();
    let lay = linattn_reference::Layout {
        batch: 1,
        heads: h,
        tokens: n,
        dim: d,
        batch_stride: h * n * d,
        token_stride: d,
        head_stride: n * d,
    };
    let f64s: Vec<Vec<f64>> = host
        .iter()
        .map(|x| x.iter().map(|&v| v as f64).collect())
        .collect();
    let view = |x| linattn_reference::View::new(x, lay).unwrap();
    let ropts = linattn_reference::LinearAttentionOptions {
        feature_map: linattn_reference::FeatureMap::EluPlusOne,
        normalize: true,
        eps: opts.eps as f64,
        scale: 1.0,
    };
    let (want, _) = linattn_reference::causal_linear_attention(
        view(&f64s[0]),
        view(&f64s[1]),
        view(&f64s[2]),
        &ropts,
        None,
    )
    .unwrap();
    for (target, parts) in [(Target::H200, 2), (Target::A100, 1)] {
        let p = validate(
            "t",
            DType::F32,
            &shape,
            None,
            &opts,
            &lens_for(&shape),
            &target,
        )
        .unwrap();
        let sched = schedule(opts.schedule, h, &p.tiling, n, p.resident_walks);
        assert_eq!(sched.parts, parts, "{}", target.arch());
        let emu = crate::Emulator::unchecked().unwrap().with_target(target);
        let dev = Device::Emulator(Arc::new(emu));
        let up = |x: &Vec<f32>| dev.upload(x).unwrap();
        let (q, k, v) = (up(&host[0]), up(&host[1]), up(&host[2]));
        let mut o = dev.upload(&vec![f32::NAN; h * n * d]).unwrap();
        forward(
            Kind::Causal,
            &dev,
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
            .map(|&x| x as f64)
            .collect();
        assert!(
            got.iter().all(|x| x.is_finite()),
            "{}: unwritten output",
            target.arch()
        );
        let err = rel_l2_error(&got, want.data());
        assert!(err < 1e-6, "{}: rel L2 error {err:e}", target.arch());
        // The raw path asks the executor: without a workspace the split
        // (H200) is refused, the walk (A100) runs.
        let emu = crate::Emulator::unchecked().unwrap().with_target(target);
        let mut o = vec![f32::NAN; h * n * d];
        let ptrs = RawForward {
            q: host[0].as_ptr() as u64,
            k: host[1].as_ptr() as u64,
            v: host[2].as_ptr() as u64,
            o: o.as_mut_ptr() as u64,
            ..RawForward::default()
        };
        // SAFETY: host buffers covering the shape; nothing else aliases o.
        let r = unsafe { forward_raw(Kind::Causal, &emu, DType::F32, &ptrs, &shape, None, &opts) };
        match (parts, r) {
            (1, Ok(())) => assert!(o.iter().all(|x| x.is_finite())),
            (2, Err(e)) => assert!(e.to_string().contains("workspace"), "{e}"),
            (_, r) => panic!("{}: {r:?}", target.arch()),
        }
    }
}

/// The forward plan's named steps on their own: the base params, one walk
/// and the scan.
#[test]
fn plan_steps_one_by_one() {
    let shape = AttentionShape::bhnd(2, 3, 500, 24, 40);
    let opts = AttentionOptions {
        schedule: ScheduleChoice::Split { parts: 4 },
        ..Default::default()
    };
    let p = problem(DType::F32, &shape, &opts);
    let sched = call_schedule(&p, &opts);
    assert_eq!(sched.parts, 4);
    let ptrs = RawForward {
        q: 1 << 20,
        k: 2 << 20,
        v: 3 << 20,
        o: 4 << 20,
        workspace: 5 << 20,
        workspace_len: workspace_len(Kind::Causal, &p, &opts),
        ..Default::default()
    };
    let base = base_params(&p, &opts, &sched, &ptrs);
    assert_eq!((base.num_parts, base.part_len), (4, sched.part_len as i64));
    assert_eq!((base.causal, base.write_output), (1, 1));
    assert_eq!(base.work_s, 5 << 20);
    assert_eq!(base.work_z, (5 << 20) + (6 * 4 * 24 * 40 * 4) as u64);
    let Launch::Walk(w) = walk_launch(DType::F16, F16Tiles::F16, &p, &sched, base) else {
        panic!("a walk step gave a scan");
    };
    assert_eq!(w.kernel, "forward_f16");
    assert_eq!(w.grid, [(6 * p.tiling.m_tiles) as u32, 4, 1]);
    let Launch::Scan(s) = scan_launch(Kind::Causal, &p, &sched, &ptrs) else {
        panic!("a scan step gave a walk");
    };
    assert_eq!(
        (s.kernel, s.params.causal, s.params.num_parts),
        ("forward_state_scan", 1, 4)
    );
    assert_eq!(
        (s.params.work_s, s.params.work_z),
        (base.work_s, base.work_z)
    );
    assert_eq!(s.grid[0] as usize, 6 * (24 * 40 + 24usize).div_ceil(256));
}
