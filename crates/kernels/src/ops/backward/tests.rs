//! Unit tests of the backward's tiling, policies, validation and plans (no
//! GPU).

use super::plan::*;
use super::tiling::*;
use super::*;
use crate::dtype::DType;
use crate::ops::attention::*;
use crate::ops::checks::MAX_GRID_X;
use crate::ops::forward::tiling::{SHARED_BUDGET_BYTES, THREADS};
use crate::params::LinattnBackwardState;
use crate::target::Target;

/// The problem of a call with full-length buffers, planned for an H200.
fn problem(dtype: DType, shape: &AttentionShape, opts: &AttentionOptions) -> BackwardProblem {
    let (lens, glens) = full_lens(shape);
    validate("t", dtype, shape, None, opts, &lens, &glens, &Target::H200).unwrap()
}

/// Where [`spread_ptrs`] puts the workspace.
const WS: u64 = 11 << 20;

/// Distinct, non-overlapping fake addresses for plan tests: tensor i at
/// i << 20 (q 1, k 2, v 3, d_o 5, dq 6, dk 7, dv 8, dS0 9, dz0 10) and the
/// workspace at [`WS`].
fn spread_ptrs() -> RawBackward {
    RawBackward {
        q: 1 << 20,
        k: 2 << 20,
        v: 3 << 20,
        d_o: 5 << 20,
        dq: 6 << 20,
        dk: 7 << 20,
        dv: 8 << 20,
        d_initial_s: 9 << 20,
        d_initial_z: 10 << 20,
        workspace: WS,
        ..Default::default()
    }
}

fn full_lens(shape: &AttentionShape) -> (Lens, GradLens) {
    let qn = shape.span(&shape.q, shape.d).unwrap();
    let kn = shape.span(&shape.k, shape.d).unwrap();
    let vn = shape.span(&shape.v, shape.m).unwrap();
    let on = shape.span(&shape.o, shape.m).unwrap();
    (
        Lens {
            q: qn,
            k: kn,
            v: vn,
            o: on,
            initial: None,
            final_state: None,
        },
        GradLens {
            d_o: on,
            dq: qn,
            dk: kn,
            dv: vn,
            d_final: None,
            d_initial: None,
        },
    )
}

#[test]
fn tiling_of_out_of_range_sizes_does_not_panic() {
    // Validation rejects these before any launch; the public tiling
    // helpers must still answer without panicking (or overflowing).
    for (d, m) in [(0, 0), (0, 7), (300, 5), (5, 1000), (usize::MAX / 4, 1)] {
        for dtype in [DType::F32, DType::F16, DType::Bf16] {
            let _ = tiling_for(dtype, d, m);
        }
    }
}

#[test]
fn tiling_fits_shared_memory_for_every_size() {
    let budget = SHARED_BUDGET_BYTES;
    for d in 1..=crate::ops::attention::MAX_DIM {
        for m in [1, 2, 17, 31, 64, 100, 128, 255, 256] {
            let t = tiling(d, m);
            assert!(prep_shared_floats(d, t.prep.chunk, t.prep.tile) * 4 <= budget);
            assert!(dqk_shared_floats(m, t.dqk.chunk, t.dqk.tile) * 4 <= budget);
            assert!(dv_shared_floats(d, t.dv.chunk, t.dv.tile) * 4 <= budget);
            for (pt, dim) in [(t.prep, m), (t.dqk, d), (t.dv, m)] {
                assert!(pt.tile >= 1 && pt.tile <= dim, "d {d} m {m} {pt:?}");
                assert_eq!(pt.tiles, dim.div_ceil(pt.tile));
                assert!((pt.tiles - 1) * pt.tile < dim);
            }
        }
    }
    // Small heads: one block per sequence-head and pass.
    let t = tiling(64, 64);
    assert_eq!((t.dqk.tiles, t.dv.tiles), (1, 1));
    assert_eq!(tiling(16, 16).dqk.chunk, 64);
}

#[test]
fn mma_tiling_fits_shared_memory_for_every_size() {
    for dtype in [DType::F16, DType::Bf16] {
        for d in 1..=crate::ops::attention::MAX_DIM {
            for m in [1, 2, 15, 16, 17, 31, 64, 100, 128, 255, 256] {
                let t = tiling_for(dtype, d, m);
                for (pass, pt, dim) in [
                    (Pass::Prep, t.prep, m),
                    (Pass::Dq, t.dqk, d),
                    (Pass::Dv, t.dv, m),
                ] {
                    assert!(shared_bytes(dtype, pass, d, m, pt) <= SHARED_BUDGET_BYTES);
                    assert_eq!(pt.chunk % 16, 0, "d {d} m {m} {pt:?}");
                    assert_eq!(pt.tile % 16, 0, "d {d} m {m} {pt:?}");
                    assert!(pt.tile >= 16 && pt.tile <= pad16(dim), "d {d} m {m} {pt:?}");
                    assert_eq!(pt.tiles, dim.div_ceil(pt.tile), "d {d} m {m} {pt:?}");
                    assert!((pt.tiles - 1) * pt.tile < dim);
                }
            }
        }
    }
    // fp32 keeps the FMA tiling.
    assert_eq!(tiling_for(DType::F32, 100, 130), tiling(100, 130));
    assert!(!uses_mma(DType::F32) && uses_mma(DType::F16) && uses_mma(DType::Bf16));
    // Small heads: one block per sequence-head and pass, chunk 64.
    let t = tiling_for(DType::Bf16, 64, 64);
    assert_eq!((t.prep.tiles, t.dqk.tiles, t.dv.tiles), (1, 1, 1));
    assert_eq!((t.prep.chunk, t.dqk.chunk, t.dv.chunk), (64, 64, 64));
    // The first anchor shape (D = M = 128): two tiles per pass.
    let t = tiling_for(DType::Bf16, 128, 128);
    for pt in [t.prep, t.dqk, t.dv] {
        assert_eq!((pt.tile, pt.tiles), (64, 2), "{t:?}");
    }
    // No more tiles than the FMA tiling at D = M = 64, 128 (at 256 the
    // 16-bit copies and the scratch cost more: 6-8 tiles against 5).
    for dim in [64, 128] {
        let (a, b) = (tiling_for(DType::F16, dim, dim), tiling(dim, dim));
        assert!(
            a.dqk.tiles <= b.dqk.tiles && a.dv.tiles <= b.dv.tiles,
            "{a:?} {b:?}"
        );
    }
}

#[test]
fn merged_dkv_policy() {
    for dtype in [DType::F16, DType::Bf16] {
        for d in 1..=crate::ops::attention::MAX_DIM {
            for m in [1, 2, 15, 16, 17, 31, 33, 64, 65, 80, 100, 128, 200, 256] {
                let t = tiling_for(dtype, d, m);
                let fits = |c: usize| dkv_mma_bytes(d, m, c) <= SHARED_BUDGET_BYTES;
                let any_fits = [64, 32].into_iter().any(fits);
                let want = dkv_threads(d, m).is_some() && any_fits;
                assert_eq!(t.dkv.is_some(), want, "{dtype:?} d {d} m {m} {t:?}");
                // The fused prep + dq walk: same rule, its own bytes
                // (two more per-row vectors: never more than dkv's
                // chunk, and only where dkv fits too).
                let pfits = |c: usize| prep_dq_mma_bytes(d, m, c) <= SHARED_BUDGET_BYTES;
                let pwant = dkv_threads(d, m).is_some() && [64, 32].into_iter().any(pfits);
                assert_eq!(t.prep_dq.is_some(), pwant, "{dtype:?} d {d} m {m} {t:?}");
                if let Some(pt) = t.prep_dq {
                    assert_eq!((pt.tiles, pt.tile), (1, pad16(d)));
                    assert!(pfits(pt.chunk) && (pt.chunk == 64 || !pfits(64)));
                    assert!(t.dkv.is_some_and(|k| k.chunk >= pt.chunk));
                    assert_eq!(
                        shared_bytes(dtype, Pass::PrepDq, d, m, pt),
                        prep_dq_mma_bytes(d, m, pt.chunk)
                    );
                    assert!(kernel_name(Pass::PrepDq, dtype, F16Tiles::F16).is_some());
                }
                if let Some(pt) = t.dkv {
                    assert_eq!((pt.tiles, pt.tile), (1, pad16(d)));
                    assert!(pt.chunk >= MIN_MERGED_CHUNK && pt.chunk % 16 == 0);
                    assert!(fits(pt.chunk), "d {d} m {m} {pt:?}");
                    // The largest chunk that fits.
                    assert!(pt.chunk == 64 || !fits(64), "d {d} m {m} {pt:?}");
                    assert_eq!(
                        shared_bytes(dtype, Pass::Dkv, d, m, pt),
                        dkv_mma_bytes(d, m, pt.chunk)
                    );
                    assert!(kernel_name(Pass::Dkv, dtype, F16Tiles::F16).is_some());
                }
            }
        }
    }
    // Small heads merge, at chunk 64 up to D = M = 64.
    for dim in [1, 16, 17, 40, 64] {
        let t = tiling_for(DType::Bf16, dim, dim).dkv.expect("merged");
        assert_eq!(t.chunk, 64, "{dim}");
    }
    assert!(tiling_for(DType::F16, 40, 24).dkv.is_some());
    // The first anchor shape (D = M = 128): dS is 64 tiles, held by 16
    // warps (512 threads), chunk 32 (chunk 64 would need 132 KB).
    let t = tiling_for(DType::Bf16, 128, 128).dkv.expect("merged");
    assert_eq!((t.chunk, t.tiles), (32, 1));
    let t = tiling_for(DType::Bf16, 128, 128).prep_dq.expect("fused");
    assert_eq!((t.chunk, t.tiles), (32, 1));
    assert_eq!(dkv_threads(128, 128), Some(512));
    assert!(dkv_mma_bytes(128, 128, 64) > SHARED_BUDGET_BYTES);
    // 256 threads up to 32 tiles, 512 up to 64, none past.
    assert_eq!(dkv_threads(64, 64), Some(256));
    assert_eq!(dkv_threads(128, 64), Some(256));
    assert_eq!(dkv_threads(129, 64), Some(512));
    assert_eq!(dkv_threads(256, 64), Some(512));
    assert_eq!(dkv_threads(129, 128), None);
    assert!(tiling_for(DType::Bf16, 200, 250).dkv.is_none());
    assert!(tiling_for(DType::Bf16, 256, 256).dkv.is_none());
    // fp32 never merges (no FMA body), and has no such kernel.
    for (d, m) in [(1, 1), (16, 16), (64, 64)] {
        assert!(tiling_for(DType::F32, d, m).dkv.is_none());
        assert!(tiling_for(DType::F32, d, m).prep_dq.is_none());
        assert!(tiling(d, m).dkv.is_none() && tiling(d, m).prep_dq.is_none());
    }
    assert_eq!(kernel_name(Pass::Dkv, DType::F32, F16Tiles::F16), None);
    assert_eq!(kernel_name(Pass::PrepDq, DType::F32, F16Tiles::Bf16), None);
    assert_eq!(
        kernel_name(Pass::Dkv, DType::F16, F16Tiles::F16),
        Some("backward_dkv_f16")
    );
    assert_eq!(
        kernel_name(Pass::Dkv, DType::F16, F16Tiles::Bf16),
        Some("backward_dkv_f16_bf16tc")
    );
    assert_eq!(
        kernel_name(Pass::Dkv, DType::Bf16, F16Tiles::Bf16),
        Some("backward_dkv_bf16")
    );
}

#[test]
fn carve_aligns_every_buffer_to_128_bytes() {
    assert_eq!(carve(&[]), 0);
    assert_eq!(carve(&[1]), 1);
    assert_eq!(carve(&[1, 1]), 129);
    assert_eq!(carve(&[128, 4, 256]), 512);
    // Every tile offset the kernels form is 32-byte aligned when the
    // row strides are multiples of 8 halves / 4 floats.
    assert_eq!((16 * (64 + 8) * 2) % 32, 0);
    assert_eq!((16 * (64 + 4) * 4) % 32, 0);
}

#[test]
fn split_schedule_policy() {
    let t = tiling_for(DType::Bf16, 128, 128);
    let chunk = t.dkv.unwrap().chunk.max(t.prep_dq.unwrap().chunk);
    let auto = ScheduleChoice::Auto;
    let h200 = whole_head_resident(&Target::H200, 128, 128, &t);
    assert_eq!(h200, 132);
    let s = |choice, dtype, sh, len| {
        let t = tiling_for(dtype, 128, 128);
        split_schedule(choice, dtype, &t, 128, 128, sh, len, h200)
    };
    // B 2, H 16, T 16384: 32 blocks become 4 x 32 = 128 (<= 132 SMs).
    let a = s(auto, DType::Bf16, 32, 16384);
    assert_eq!(a.parts, 4);
    assert_eq!(a.part_len, 4096);
    assert_eq!(a.part_len % chunk, 0);
    // 64 sequence-heads: 2 partitions; 96 fill the GPU: no split.
    assert_eq!(s(auto, DType::Bf16, 64, 2048).parts, 2);
    assert_eq!(s(auto, DType::Bf16, 96, 8192).parts, 1);
    // Partitions of at least four chunks.
    assert_eq!(s(auto, DType::Bf16, 1, 7 * chunk).parts, 1);
    assert_eq!(s(auto, DType::Bf16, 1, 8 * chunk).parts, 2);
    // f32 has no whole-head walks; Walk never splits; Split forces,
    // capped by the chunks, and the last partition may be short.
    assert_eq!(s(auto, DType::F32, 1, 16384).parts, 1);
    assert_eq!(s(ScheduleChoice::Walk, DType::Bf16, 1, 16384).parts, 1);
    assert_eq!(
        s(
            ScheduleChoice::Split { parts: 3 },
            DType::F16,
            200,
            2 * chunk
        )
        .parts,
        2
    );
    let f = s(
        ScheduleChoice::Split { parts: 3 },
        DType::Bf16,
        2,
        5 * chunk + 7,
    );
    assert_eq!((f.parts, f.part_len), (3, 2 * chunk));
    // D = M = 256 keeps the tiled passes: nothing resident, no split.
    let t256 = tiling_for(DType::Bf16, 256, 256);
    assert_eq!(whole_head_resident(&Target::H200, 256, 256, &t256), 0);
    assert_eq!(
        split_schedule(auto, DType::Bf16, &t256, 256, 256, 1, 1 << 16, 132).parts,
        1
    );
    // A scan grid past the x limit: no split.
    assert_eq!(
        s(
            ScheduleChoice::Split { parts: 2 },
            DType::Bf16,
            MAX_GRID_X,
            16384
        )
        .parts,
        1
    );
}

/// The split per architecture at bf16 D = M = 128 (512-thread
/// whole-head walks: one block per SM everywhere).
#[test]
fn split_schedule_per_architecture() {
    let t = tiling_for(DType::Bf16, 128, 128);
    let a100 = Target::A100;
    let sm86 = Target::sm86(84);
    for (g, want) in [(Target::H200, 132), (a100, 108), (sm86, 84)] {
        assert_eq!(whole_head_resident(&g, 128, 128, &t), want, "{}", g.arch());
    }
    let parts = |g: &Target, sh: usize, len: usize| {
        let r = whole_head_resident(g, 128, 128, &t);
        split_schedule(ScheduleChoice::Auto, DType::Bf16, &t, 128, 128, sh, len, r).parts
    };
    // B 2, H 16, T 16384 (32 sequence-heads): 4 on the H200 (128 of
    // 132 SMs), 3 on the A100 (96 of 108: one wave, not 128 in two),
    // 2 on an 84-SM sm_86.
    assert_eq!(parts(&Target::H200, 32, 16384), 4);
    assert_eq!(parts(&a100, 32, 16384), 3);
    assert_eq!(parts(&sm86, 32, 16384), 2);
    // 60 sequence-heads: two on the H200, none on the A100 or sm_86.
    assert_eq!(parts(&Target::H200, 60, 16384), 2);
    assert_eq!(parts(&a100, 60, 16384), 1);
    assert_eq!(parts(&sm86, 60, 16384), 1);
    // At 256 threads (D = M = 64) two blocks fit an SM where shared
    // memory allows: the H200 holds two, the 100 KiB parts one.
    let t64 = tiling_for(DType::Bf16, 64, 64);
    assert_eq!(dkv_threads(64, 64), Some(256));
    assert_eq!(whole_head_resident(&Target::H200, 64, 64, &t64), 264);
    assert_eq!(whole_head_resident(&sm86, 64, 64, &t64), 84);
    // Every split grid stays within one wave.
    for g in [Target::H200, a100, sm86, Target::sm89(142)] {
        let r = whole_head_resident(&g, 128, 128, &t);
        for sh in 1..300 {
            let p = parts(&g, sh, 1 << 16);
            assert!(p == 1 || sh * p <= r, "{} {sh}: {p}", g.arch());
        }
    }
}

/// The footprint the policy assumes is the one the `.cu` files declare.
#[test]
fn whole_head_launch_bounds_match_the_sources() {
    let (threads, min_blocks) = WHOLE_HEAD_LAUNCH_BOUNDS;
    let bounds = format!("__launch_bounds__({threads}, {min_blocks})");
    let src = include_str!("../../../../../cuda/backward.cu");
    for dtype in [DType::F16, DType::Bf16] {
        for pass in [Pass::Dkv, Pass::PrepDq] {
            for tiles in [F16Tiles::F16, F16Tiles::Bf16] {
                let name = kernel_name(pass, dtype, tiles).unwrap();
                let decl = format!("{bounds} {name}(");
                assert!(src.contains(&decl), "missing `{decl}`");
            }
        }
    }
}

/// `AttentionOptions::dq_precision` reaches every launch's params (the
/// kernels read it in the passes that feed dq), `Split` by default.
#[test]
fn dq_precision_reaches_every_launch() {
    use crate::params::LinattnDqPrecision::*;
    for (d, m) in [(64, 64), (256, 256)] {
        let shape = AttentionShape::bhnd(1, 2, 100, d, m);
        let ptrs = RawBackward {
            d_initial_s: 0,
            d_initial_z: 0,
            ..spread_ptrs()
        };
        for (choice, want) in [
            (None, LINATTN_DQ_SPLIT),
            (Some(DqPrecision::Split), LINATTN_DQ_SPLIT),
            (Some(DqPrecision::Single), LINATTN_DQ_SINGLE),
        ] {
            let mut opts = AttentionOptions::default();
            if let Some(c) = choice {
                opts.dq_precision = c;
            }
            let bp = problem(DType::Bf16, &shape, &opts);
            let l = plan(Kind::Causal, DType::Bf16, &bp, &opts, &ptrs);
            assert!(!l.is_empty());
            for x in &l {
                assert_eq!(x.plan.params.dq_precision, want as i32, "{:?}", x.pass);
            }
        }
    }
}

#[test]
fn split_plans_sum_scan_and_walk() {
    let (h, n, d, m) = (2, 1000, 40, 24);
    let shape = AttentionShape::bhnd(1, h, n, d, m);
    let opts = AttentionOptions {
        schedule: ScheduleChoice::Split { parts: 3 },
        ..Default::default()
    };
    let bp = problem(DType::F16, &shape, &opts);
    assert_eq!(bp.schedule.parts, 3);
    let rows = n * h;
    let norm = (1 + bp.tiling.prep.tiles) * rows;
    assert_eq!(workspace_len(&bp), norm + h * 3 * (d * m + d));
    let ws = WS;
    let ptrs = RawBackward {
        d_initial_s: 0,
        d_initial_z: 0,
        ..spread_ptrs()
    };
    use LinattnBackwardState::*;
    // (pass, state mode) of each launch, and the six a split plans with
    // the given scans.
    let modes = |l: &[BackwardLaunch]| -> Vec<(Pass, i32)> {
        l.iter()
            .map(|l| (l.pass, l.plan.params.state_mode))
            .collect()
    };
    let six = |into_dq: LinattnBackwardState, into_dkv: LinattnBackwardState| {
        [
            (Pass::PrepDq, LINATTN_BWD_PARTIALS),
            (Pass::StateScan, into_dq),
            (Pass::PrepDq, LINATTN_BWD_FROM_WORK),
            (Pass::Dkv, LINATTN_BWD_PARTIALS),
            (Pass::StateScan, into_dkv),
            (Pass::Dkv, LINATTN_BWD_FROM_WORK),
        ]
        .map(|(p, s)| (p, s as i32))
    };
    let l = plan(Kind::Causal, DType::F16, &bp, &opts, &ptrs);
    assert_eq!(
        modes(&l),
        six(LINATTN_BWD_SCAN_PREFIX, LINATTN_BWD_SCAN_SUFFIX)
    );
    let work_s = ws + (norm * 4) as u64;
    for x in &l {
        let p = &x.plan.params;
        assert_eq!(
            (p.work_s, p.work_z),
            (work_s, work_s + (h * 3 * d * m * 4) as u64)
        );
        assert_eq!((p.num_parts, p.part_len), (3, bp.schedule.part_len as i64));
        if x.pass == Pass::StateScan {
            assert_eq!(x.plan.kernel, "backward_state_scan");
            assert_eq!(x.plan.grid, [(h * scan_blocks(d, m)) as u32, 1, 1]);
            assert_eq!(x.plan.shared_bytes, 0);
        } else {
            assert_eq!(x.plan.grid, [h as u32, 3, 1]);
        }
    }
    // Partition sums and scans write the partition states only.
    for i in [0, 1, 3, 4] {
        assert_eq!(l[i].writes, [(work_s, h * 3 * (d * m + d) * 4)]);
    }
    // Non-causal: the scans put the total in every slot.
    let nc = plan(Kind::NonCausal, DType::F16, &bp, &opts, &ptrs);
    assert_eq!(
        modes(&nc),
        six(LINATTN_BWD_SCAN_TOTAL_IN, LINATTN_BWD_SCAN_TOTAL_FINAL)
    );
    assert_eq!(nc[1].plan.kernel, "backward_state_scan");
}

#[test]
fn plans_have_the_expected_launches() {
    let shape = AttentionShape::bhnd(2, 3, 100, 40, 24);
    let opts = AttentionOptions::default();
    let bp = problem(DType::Bf16, &shape, &opts);
    assert_eq!(bp.tiling, tiling_for(DType::Bf16, 40, 24));
    let pt = bp.tiling.prep.tiles;
    assert_eq!(workspace_len(&bp), (1 + pt) * 2 * 100 * 3);
    let ptrs = spread_ptrs();
    // A small head: prep + dq fused, dk + dv merged, one workspace slot.
    let t = bp.tiling;
    let dkv = t.dkv.expect("40 x 24 takes the merged walk");
    let pdq = t.prep_dq.expect("40 x 24 takes the fused walk");
    let l = plan(Kind::Causal, DType::Bf16, &bp, &opts, &ptrs);
    let passes: Vec<Pass> = l.iter().map(|l| l.pass).collect();
    assert_eq!(passes, [Pass::PrepDq, Pass::Dkv]);
    assert_eq!(l[0].plan.kernel, "backward_prepdq_bf16");
    assert_eq!(l[1].plan.kernel, "backward_dkv_bf16");
    assert!(l.iter().all(|x| x.plan.grid == [6, 1, 1]
        && x.plan.block == [256, 1, 1]
        && x.plan.params.tiles == 1
        && x.plan.params.prep_tiles == 1));
    assert_eq!(l[0].plan.params.chunk as usize, pdq.chunk);
    assert_eq!(
        l[0].plan.shared_bytes as usize,
        prep_dq_mma_bytes(40, 24, pdq.chunk)
    );
    assert_eq!(
        l[0].writes,
        [
            (11 << 20, 2 * 100 * 3 * 4),
            ((11 << 20) + 2 * 100 * 3 * 4, 2 * 100 * 3 * 4),
            (6 << 20, 2 * 3 * 100 * 40 * 2)
        ]
    );
    assert_eq!(l[1].plan.params.chunk as usize, dkv.chunk);
    assert_eq!(
        l[1].plan.shared_bytes as usize,
        dkv_mma_bytes(40, 24, dkv.chunk)
    );
    assert_eq!(
        l[1].writes,
        [
            (7 << 20, 2 * 3 * 100 * 40 * 2),
            (8 << 20, 2 * 3 * 100 * 24 * 2),
            (9 << 20, 6 * 40 * 24 * 4),
            (10 << 20, 6 * 40 * 4)
        ]
    );
    for x in &l {
        assert!(x.plan.shared_bytes as usize <= SHARED_BUDGET_BYTES);
    }
    // The same shape in fp32: separate dk and dv walks.
    let bp32 = problem(DType::F32, &shape, &opts);
    assert!(bp32.tiling.dkv.is_none());
    let l = plan(Kind::Causal, DType::F32, &bp32, &opts, &ptrs);
    let passes: Vec<Pass> = l.iter().map(|l| l.pass).collect();
    assert_eq!(passes, [Pass::Prep, Pass::Dq, Pass::Dk, Pass::Dv]);
    // A hand-built fp32 problem naming the merged walk (which fp32 does
    // not have) still plans the separate walks, with real kernel names.
    let mut forced = bp32.clone();
    forced.tiling.dkv = Some(dkv);
    forced.tiling.prep_dq = Some(pdq);
    let lf = plan(Kind::Causal, DType::F32, &forced, &opts, &ptrs);
    let passes: Vec<Pass> = lf.iter().map(|l| l.pass).collect();
    assert_eq!(passes, [Pass::Prep, Pass::Dq, Pass::Dk, Pass::Dv]);
    assert!(lf.iter().all(|l| !l.plan.kernel.is_empty()));
    assert_eq!(l[0].plan.kernel, "backward_prep_f32");
    let pt = bp32.tiling.prep.tiles;
    assert_eq!(l[0].plan.grid, [(6 * pt) as u32, 1, 1]);
    assert_eq!(l[0].plan.params.work_dden, (11 << 20) + 2 * 100 * 3 * 4);
    assert_eq!(
        l[0].writes,
        [(11 << 20, 2400), ((11 << 20) + 2400, pt * 2400)]
    );
    assert!(l.iter().all(|x| x.plan.params.prep_tiles as usize == pt));
    let t = bp32.tiling;
    assert_eq!(l[1].plan.grid, [(6 * t.dqk.tiles) as u32, 1, 1]);
    assert_eq!(l[3].plan.grid, [(6 * t.dv.tiles) as u32, 1, 1]);
    assert_eq!(l[3].plan.params.tile as usize, t.dv.tile);
    // dk writes dk and the initial state's gradient.
    assert_eq!(
        l[2].writes,
        [
            (7 << 20, 2 * 3 * 100 * 40 * 4),
            (9 << 20, 6 * 40 * 24 * 4),
            (10 << 20, 6 * 40 * 4)
        ]
    );
    for x in &l {
        assert!(x.plan.shared_bytes as usize <= SHARED_BUDGET_BYTES);
        assert_eq!(x.plan.params.causal, 1);
    }
    // D = M = 128 (the first anchor shape): the merged walk with 512
    // threads; a hand-built D = M = 256 tiling naming it (its dS does
    // not fit the fragments) plans the separate walks.
    for (dim, merged) in [(128, true), (256, false)] {
        let shape = AttentionShape::bhnd(1, 2, 50, dim, dim);
        let mut bp = problem(DType::F16, &shape, &opts);
        let whole = Some(PassTiling {
            chunk: 32,
            tile: dim,
            tiles: 1,
        });
        (bp.tiling.dkv, bp.tiling.prep_dq) = (whole, whole);
        let l = plan(Kind::Causal, DType::F16, &bp, &opts, &ptrs);
        let passes: Vec<Pass> = l.iter().map(|l| l.pass).collect();
        if merged {
            assert_eq!(passes, [Pass::PrepDq, Pass::Dkv]);
        } else {
            assert_eq!(passes, [Pass::Prep, Pass::Dq, Pass::Dk, Pass::Dv]);
        }
        let block = if merged { 512 } else { THREADS };
        assert!(l.iter().all(|x| x.plan.block == [block, 1, 1]), "{dim}");
    }
    // Without normalisation: no prep, no workspace, o not needed.
    let plain = AttentionOptions {
        normalize: false,
        ..opts
    };
    let bp2 = problem(DType::F32, &shape, &plain);
    assert_eq!(workspace_len(&bp2), 0);
    let l = plan(Kind::NonCausal, DType::F32, &bp2, &plain, &ptrs);
    assert_eq!(l.len(), 3);
    assert_eq!(l[0].plan.kernel, "backward_dq_f32");
    assert_eq!(l[0].plan.params.causal, 0);
    assert_eq!(l[0].plan.params.work_den, 0);
    // ... and in bf16 the fused walk writes dq alone.
    let bp3 = problem(DType::Bf16, &shape, &plain);
    let l = plan(Kind::NonCausal, DType::Bf16, &bp3, &plain, &ptrs);
    assert_eq!(l[0].plan.kernel, "backward_prepdq_bf16");
    assert_eq!(l[0].writes, [(6 << 20, 2 * 3 * 100 * 40 * 2)]);
    assert_eq!(
        (l[0].plan.params.work_den, l[0].plan.params.normalize),
        (0, 0)
    );
}

#[test]
fn validation_rejects_bad_calls() {
    let shape = AttentionShape::bnhd(2, 3, 10, 17, 5);
    let opts = AttentionOptions::default();
    let (lens, glens) = full_lens(&shape);
    assert!(validate(
        "t",
        DType::F32,
        &shape,
        None,
        &opts,
        &lens,
        &glens,
        &Target::H200
    )
    .is_ok());
    let err = |s: &AttentionShape, o: &AttentionOptions, l: &Lens, g: &GradLens| {
        validate("t", DType::F32, s, None, o, l, g, &Target::H200)
            .unwrap_err()
            .to_string()
    };
    let e = err(
        &shape,
        &opts,
        &lens,
        &GradLens {
            d_o: glens.d_o - 1,
            ..glens
        },
    );
    assert!(e.contains("`d_o`") && e.contains("need"), "{e}");
    let e = err(&shape, &opts, &lens, &GradLens { dv: 3, ..glens });
    assert!(e.contains("`dv`"), "{e}");
    let e = err(
        &shape,
        &opts,
        &lens,
        &GradLens {
            d_initial: Some((2 * 3 * 17 * 5, 1)),
            ..glens
        },
    );
    assert!(e.contains("d_initial"), "{e}");
    // Gradient rows of q's strides must not overlap.
    let mut bad = shape;
    bad.q.token = 1;
    let e = err(&bad, &opts, &lens, &glens);
    assert!(e.contains("`dq`") && e.contains("overlap"), "{e}");
    // The forward's checks apply too.
    let e = err(&AttentionShape { d: 0, ..shape }, &opts, &lens, &glens);
    assert!(e.contains("1..=256"), "{e}");
    let e = err(
        &shape,
        &AttentionOptions {
            eps: f32::NAN,
            ..opts
        },
        &lens,
        &glens,
    );
    assert!(e.contains("eps"), "{e}");
}

#[test]
fn raw_checks_catch_overlaps_and_nulls() {
    let shape = AttentionShape::bhnd(1, 1, 4, 2, 2);
    let opts = AttentionOptions::default();
    let bp = problem(DType::F32, &shape, &opts);
    let ok = RawBackward {
        q: 1000,
        k: 2000,
        v: 3000,
        d_o: 5000,
        dq: 6000,
        dk: 7000,
        dv: 8000,
        workspace: 9000,
        workspace_len: workspace_len(&bp),
        ..Default::default()
    };
    assert!(check_raw("t", DType::F32, &ok, &bp).is_ok());
    // One element short of what this call needs.
    let short = RawBackward {
        workspace_len: workspace_len(&bp) - 1,
        ..ok
    };
    let e = check_raw("t", DType::F32, &short, &bp).unwrap_err();
    assert!(e.to_string().contains("needs a workspace of"), "{e}");
    let e = check_raw("t", DType::F32, &RawBackward { dq: 5004, ..ok }, &bp).unwrap_err();
    assert!(e.to_string().contains("overlaps `d_o`"), "{e}");
    let e = check_raw("t", DType::F32, &RawBackward { dk: 0, ..ok }, &bp).unwrap_err();
    assert!(e.to_string().contains("null"), "{e}");
    let e = check_raw("t", DType::F32, &RawBackward { workspace: 0, ..ok }, &bp).unwrap_err();
    assert!(e.to_string().contains("workspace"), "{e}");
    let e = check_raw(
        "t",
        DType::F32,
        &RawBackward {
            d_final_s: 20000,
            ..ok
        },
        &bp,
    )
    .unwrap_err();
    assert!(e.to_string().contains("together"), "{e}");
    let e = check_raw(
        "t",
        DType::F32,
        &RawBackward {
            workspace: 8010,
            ..ok
        },
        &bp,
    )
    .unwrap_err();
    assert!(e.to_string().contains("overlaps"), "{e}");
}

/// Each named step of the backward plan on its own: the layout's
/// workspace offsets, the base params, the split prelude, and the two
/// halves of the plan, split and not.
#[test]
fn plan_steps_one_by_one() {
    use LinattnBackwardState::*;
    let (h, n, d, m) = (2, 1000, 40, 24);
    let shape = AttentionShape::bhnd(1, h, n, d, m);
    let ws = WS;
    let ptrs = spread_ptrs();
    let bp_of = |dtype: DType, schedule: ScheduleChoice, normalize: bool| {
        let opts = AttentionOptions {
            schedule,
            normalize,
            ..Default::default()
        };
        let bp = problem(dtype, &shape, &opts);
        (bp, opts)
    };
    let rows = n * h;

    // Split, f16: whole-head walks, partition states after the per-token part.
    let (bp, opts) = bp_of(DType::F16, ScheduleChoice::Split { parts: 3 }, true);
    let lay = layout(DType::F16, &bp, &ptrs);
    assert!(lay.split && lay.fused.is_some() && lay.merged.is_some());
    assert_eq!(lay.prep_slots, 1);
    assert_eq!((lay.work_den, lay.work_dden), (ws, ws + (rows * 4) as u64));
    let norm = (1 + bp.tiling.prep.tiles) * rows;
    assert_eq!(lay.work_s, ws + (norm * 4) as u64);
    assert_eq!(lay.work_z, lay.work_s + (h * 3 * d * m * 4) as u64);
    let base = base_params(Kind::NonCausal, &bp, &opts, &ptrs, &lay);
    assert_eq!((base.causal, base.num_parts, base.prep_tiles), (0, 3, 1));
    assert_eq!(
        (base.work_s, base.dq, base.d_initial_z),
        (lay.work_s, 6 << 20, 10 << 20)
    );
    let steps = Steps::new(Kind::Causal, DType::F16, &bp, &opts, &ptrs);
    let pt = lay.merged.unwrap();
    let [sums, scan] = steps.split_prelude(Pass::Dkv, pt, LINATTN_BWD_SCAN_SUFFIX);
    assert_eq!(sums.plan.params.state_mode, LINATTN_BWD_PARTIALS as i32);
    assert_eq!(sums.plan.grid[1], 3, "partition sums run per partition");
    assert_eq!((scan.pass, scan.plan.grid[1]), (Pass::StateScan, 1));
    assert_eq!(scan.plan.params.state_mode, LINATTN_BWD_SCAN_SUFFIX as i32);
    assert_eq!(scan.writes, vec![(lay.work_s, h * 3 * (d * m + d) * 4)]);
    let passes = |l: Vec<BackwardLaunch>| l.iter().map(|l| l.pass).collect::<Vec<_>>();
    use Pass::*;
    assert_eq!(
        passes(steps.prep_dq_launches()),
        [PrepDq, StateScan, PrepDq]
    );
    assert_eq!(passes(steps.dk_dv_launches()), [Dkv, StateScan, Dkv]);

    // f32: the tiled passes; prep only when normalising.
    for normalize in [true, false] {
        let (bp, opts) = bp_of(DType::F32, ScheduleChoice::Auto, normalize);
        let steps = Steps::new(Kind::Causal, DType::F32, &bp, &opts, &ptrs);
        assert!(!steps.layout.split && steps.layout.fused.is_none());
        assert_eq!(steps.layout.work_den != 0, normalize);
        let want: &[Pass] = if normalize { &[Prep, Dq] } else { &[Dq] };
        assert_eq!(passes(steps.prep_dq_launches()), want);
        let dkdv = steps.dk_dv_launches();
        assert_eq!(passes(dkdv.clone()), [Dk, Dv]);
        // dk writes dk and the initial state's gradient; dv only dv.
        assert_eq!(dkdv[0].writes.len(), 3);
        assert_eq!(dkdv[1].writes, vec![(ptrs.dv, h * n * m * 4)]);
    }
}
