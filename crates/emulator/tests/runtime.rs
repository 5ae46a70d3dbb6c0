//! Runtime tests against the kernels in tests/cuda/basic.cu.

use linattn_emulator::{test_kernels, EmuError, LaunchConfig, Module};

fn module() -> Module {
    test_kernels::module()
}

#[repr(C)]
struct SumParams {
    input: *const f32,
    output: *mut f32,
    n: u32,
}

fn block_sums(kernel: &str, shared: usize) -> Vec<f32> {
    let input: Vec<f32> = (0..10_000).map(|i| (i % 97) as f32).collect();
    let mut out = vec![0f32; 8];
    let p = SumParams {
        input: input.as_ptr(),
        output: out.as_mut_ptr(),
        n: input.len() as u32,
    };
    let cfg = LaunchConfig::new([8, 1, 1], [256, 1, 1], shared);
    unsafe { module().launch_params(kernel, &cfg, &p) }.unwrap();
    let total: f32 = out.iter().sum();
    let expect: f32 = input.iter().sum();
    assert_eq!(total, expect);
    out
}

#[test]
fn registry_lists_kernels_and_checks_params_size() {
    let m = module();
    assert!(m.has_kernel("emu_test_block_sum"));
    assert!(m.kernel_names().contains(&"emu_test_votes"));
    assert_eq!(
        m.params_size("emu_test_block_sum"),
        Some(std::mem::size_of::<SumParams>())
    );
    assert_eq!(m.params_size("emu_test_no_params"), Some(0));
    let cfg = LaunchConfig::linear(1, 32);
    let p = 0u32;
    let err = unsafe { m.launch_params("emu_test_block_sum", &cfg, &p) }.unwrap_err();
    assert!(
        matches!(
            err,
            EmuError::ParamsSize {
                expected: 24,
                got: 4,
                ..
            }
        ),
        "{err}"
    );
    let err = unsafe { m.launch("nope", &cfg, std::ptr::null(), 0) }.unwrap_err();
    assert!(matches!(err, EmuError::UnknownKernel { .. }), "{err}");
    unsafe { m.launch("emu_test_no_params", &cfg, std::ptr::null(), 0) }.unwrap();
}

#[test]
fn block_reduction_static_shared() {
    block_sums("emu_test_block_sum", 0);
}

#[test]
fn block_reduction_dynamic_shared() {
    block_sums("emu_test_block_sum_dyn", 256 * 4);
}

#[repr(C)]
struct ShflParams {
    out: *mut i32,
    out64: *mut i64,
    outd: *mut f64,
    outh: *mut u16,
}

#[test]
fn shuffles_all_variants_and_widths() {
    let n = 64usize;
    let mut out = vec![0i32; 6 * 4 * n];
    let mut out64 = vec![0i64; n];
    let mut outd = vec![0f64; n];
    let mut outh = vec![0u16; 4 * n];
    let p = ShflParams {
        out: out.as_mut_ptr(),
        out64: out64.as_mut_ptr(),
        outd: outd.as_mut_ptr(),
        outh: outh.as_mut_ptr(),
    };
    unsafe { module().launch_params("emu_test_shuffles", &LaunchConfig::linear(1, n as u32), &p) }
        .unwrap();
    let val = |t: usize| (t * 7 + 3) as i32;
    for (wi, w) in [32usize, 16, 8, 4, 2, 1].into_iter().enumerate() {
        for t in 0..n {
            let lane = t % 32;
            let warp_base = t - lane;
            let seg = lane - lane % w;
            let base = wi * 4 * n;
            // idx
            let src = seg + ((lane * 3 + 1) % 32) % w;
            assert_eq!(out[base + t], val(warp_base + src), "idx w={w} t={t}");
            // up
            let expect = if lane % w >= 3 { val(t - 3) } else { val(t) };
            assert_eq!(out[base + n + t], expect, "up w={w} t={t}");
            // down
            let expect = if lane % w + 3 < w { val(t + 3) } else { val(t) };
            assert_eq!(out[base + 2 * n + t], expect, "down w={w} t={t}");
            // xor: lanes may read earlier segments but not later ones
            let j = lane ^ 5;
            let expect = if j < seg + w {
                val(warp_base + j)
            } else {
                val(t)
            };
            assert_eq!(out[base + 3 * n + t], expect, "xor w={w} t={t}");
        }
    }
    for t in 0..n {
        let s = t ^ 1;
        assert_eq!(out64[t], ((s as i64) << 40) | s as i64);
        let expect = if t % 32 == 31 {
            0.5 + t as f64
        } else {
            0.5 + (t + 1) as f64
        };
        assert_eq!(outd[t], expect);
        let up = if t % 32 == 0 { t } else { t - 1 };
        assert_eq!(
            outh[4 * t],
            half::f16::from_f32(0.5 * up as f32).to_bits(),
            "half t={t}"
        );
        assert_eq!(
            outh[4 * t + 1],
            half::bf16::from_f32(2.0 * (t ^ 2) as f32).to_bits(),
            "bf16 t={t}"
        );
        assert_eq!(outh[4 * t + 2], 1, "float broadcast t={t}");
        assert_eq!(
            outh[4 * t + 3] as usize,
            (t - t % 32) + 31,
            "unsigned t={t}"
        );
    }
}

#[repr(C)]
struct VoteParams {
    out: *mut u32,
}

#[test]
fn votes_and_syncthreads_reductions() {
    let n = 64usize;
    let mut out = vec![0u32; 8 * n];
    let p = VoteParams {
        out: out.as_mut_ptr(),
    };
    unsafe { module().launch_params("emu_test_votes", &LaunchConfig::linear(1, n as u32), &p) }
        .unwrap();
    let ballot = (0..32)
        .filter(|l| l % 3 == 0)
        .fold(0u32, |m, l| m | (1 << l));
    for t in 0..n {
        let o = &out[8 * t..8 * t + 8];
        assert_eq!(o[0], ballot, "ballot t={t}");
        assert_eq!(o[1], (t >= 32) as u32, "any t={t}");
        assert_eq!(o[2], (t < 32) as u32, "all t={t}");
        assert_eq!(o[3], (0..n).filter(|x| x % 5 == 0).count() as u32, "count");
        assert_eq!(o[4], 1, "and");
        assert_eq!(o[5], 1, "or");
        assert_eq!(o[6], u32::MAX, "activemask");
        assert_eq!(
            o[7],
            (0..32).sum::<u32>(),
            "reduce_add and partial-mask ballot t={t}"
        );
    }
}

#[repr(C)]
struct AtomicParams {
    counter_i: *mut i32,
    counter_u: *mut u32,
    counter_ull: *mut u64,
    counter_f: *mut f32,
    counter_d: *mut f64,
    max_i: *mut i32,
    min_i: *mut i32,
    exch: *mut u32,
    cas_hits: *mut i32,
    shared_result: *mut u32,
}

#[test]
fn atomics_under_contention_across_os_threads() {
    let blocks = 64u32;
    let threads = 128u32;
    let total = (blocks * threads) as i64;
    let (mut ci, mut cu, mut cull, mut cf, mut cd) = (0i32, 0u32, 0u64, 0f32, 0f64);
    let (mut mx, mut mn, mut ex) = (i32::MIN, i32::MAX, 0u32);
    let mut cas = [0i32; 2];
    let mut shared = vec![0u32; blocks as usize];
    let p = AtomicParams {
        counter_i: &mut ci,
        counter_u: &mut cu,
        counter_ull: &mut cull,
        counter_f: &mut cf,
        counter_d: &mut cd,
        max_i: &mut mx,
        min_i: &mut mn,
        exch: &mut ex,
        cas_hits: cas.as_mut_ptr(),
        shared_result: shared.as_mut_ptr(),
    };
    unsafe {
        module().launch_params(
            "emu_test_atomics",
            &LaunchConfig::linear(blocks, threads),
            &p,
        )
    }
    .unwrap();
    assert_eq!(ci as i64, total);
    assert_eq!(cu as i64, 2 * total);
    assert_eq!(cull as i64, 3 * total);
    assert_eq!(cf as i64, total); // exact: all partial sums are small integers
    assert_eq!(cd, 0.5 * total as f64);
    assert_eq!(mx as i64, total - 1);
    assert_eq!(mn as i64, -(total - 1));
    assert_eq!(ex, 7);
    assert_eq!(cas, [1, 1]);
    assert!(shared.iter().all(|&c| c == threads));
}

#[repr(C)]
struct PoisonParams {
    out: *mut f32,
}

#[test]
fn unwritten_shared_memory_reads_nan() {
    let mut out = vec![0f32; 2 * 64];
    let p = PoisonParams {
        out: out.as_mut_ptr(),
    };
    unsafe {
        module().launch_params(
            "emu_test_poison",
            &LaunchConfig::new([2, 1, 1], [64, 1, 1], 64 * 4),
            &p,
        )
    }
    .unwrap();
    assert!(out.iter().all(|v| v.is_nan()), "{out:?}");
}

#[repr(C)]
struct RaceParams {
    out: *mut f32,
    racy_block: u32,
}

#[test]
fn launch_checked_finds_missing_barrier_block() {
    let blocks = 6usize;
    let threads = 128usize;
    let m = module();
    let cfg = LaunchConfig::linear(blocks as u32, threads as u32);
    let mut out = vec![0f32; blocks * threads];
    let outputs = [(out.as_mut_ptr() as *mut u8, out.len() * 4)];
    // No racy block: passes.
    let p = RaceParams {
        out: out.as_mut_ptr(),
        racy_block: u32::MAX,
    };
    unsafe {
        m.launch_checked(
            "emu_test_missing_barrier",
            &cfg,
            (&p as *const RaceParams).cast(),
            std::mem::size_of::<RaceParams>(),
            &outputs,
        )
    }
    .unwrap();
    assert_eq!(out[5], 6.0);
    // Block 4 lacks its barrier: named.
    let p = RaceParams {
        out: out.as_mut_ptr(),
        racy_block: 4,
    };
    let err = unsafe {
        m.launch_checked(
            "emu_test_missing_barrier",
            &cfg,
            (&p as *const RaceParams).cast(),
            std::mem::size_of::<RaceParams>(),
            &outputs,
        )
    }
    .unwrap_err();
    match &err {
        EmuError::ScheduleDependent {
            kernel,
            block,
            region,
            first_index,
        } => {
            assert_eq!(kernel, "emu_test_missing_barrier");
            assert_eq!(*block, [4, 0, 0]);
            assert_eq!(*region, 0);
            assert_eq!(*first_index, 4 * threads * 4);
        }
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("missing __syncthreads"), "{err}");
}

#[repr(C)]
struct DivParams {
    out: *mut i32,
    mode: i32,
}

fn run_divergent(mode: i32) -> Result<(), EmuError> {
    let mut out = vec![0i32; 64];
    let p = DivParams {
        out: out.as_mut_ptr(),
        mode,
    };
    unsafe {
        module().launch_params(
            "emu_test_divergent",
            &LaunchConfig::new([3, 1, 1], [64, 1, 1], 0),
            &p,
        )
    }
}

#[test]
fn divergent_barriers_are_errors_not_hangs() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = (0..4).map(run_divergent).collect::<Vec<_>>();
        let _ = tx.send(r);
    });
    let r = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the emulator hung");
    match &r[0] {
        Err(EmuError::DivergentBarrier {
            kernel,
            block,
            detail,
        }) => {
            assert_eq!(kernel, "emu_test_divergent");
            assert_eq!(*block, [0, 0, 0]);
            assert!(detail.contains("exited"), "{detail}");
        }
        other => panic!("mode 0: {other:?}"),
    }
    match &r[1] {
        Err(EmuError::DivergentBarrier { detail, .. }) => {
            assert!(detail.contains("__syncwarp"), "{detail}")
        }
        other => panic!("mode 1: {other:?}"),
    }
    match &r[2] {
        Err(EmuError::WarpCollective { detail, .. }) => {
            assert!(detail.contains("exited"), "{detail}")
        }
        other => panic!("mode 2: {other:?}"),
    }
    assert!(r[3].is_ok());
}

#[test]
fn launch_configuration_is_validated() {
    let m = module();
    let p = 0i32;
    let launch = |cfg: LaunchConfig| unsafe { m.launch_params("emu_test_bad_width", &cfg, &p) };
    for cfg in [
        LaunchConfig::new([1, 1, 1], [0, 1, 1], 0),
        LaunchConfig::new([1, 1, 1], [1025, 1, 1], 0),
        LaunchConfig::new([1, 1, 1], [32, 32, 2], 0),
        LaunchConfig::new([0, 1, 1], [32, 1, 1], 0),
        LaunchConfig::new([1, 65536, 1], [32, 1, 1], 0),
        LaunchConfig::new([1, 1, 70000], [32, 1, 1], 0),
        LaunchConfig::new([1, 1, 1], [32, 1, 1], 228 * 1024),
    ] {
        match launch(cfg) {
            Err(EmuError::InvalidLaunch { kernel, .. }) => assert_eq!(kernel, "emu_test_bad_width"),
            other => panic!("{cfg:?}: {other:?}"),
        }
    }
}

#[test]
fn device_faults_and_shared_limit() {
    let m = module();
    let p = 3i32; // width 3 is not a power of two
    let err = unsafe { m.launch_params("emu_test_bad_width", &LaunchConfig::linear(2, 32), &p) }
        .unwrap_err();
    assert!(matches!(err, EmuError::WarpCollective { .. }), "{err}");
    let mut out = [0f32; 1];
    let sp = SumParams {
        input: std::ptr::null(),
        output: out.as_mut_ptr(),
        n: 0,
    };
    let small = m.clone().with_shared_limit(32 * 1024);
    let err =
        unsafe { small.launch_params("emu_test_big_shared", &LaunchConfig::linear(1, 32), &sp) }
            .unwrap_err();
    assert!(
        matches!(err, EmuError::SharedMemoryLimit { limit: 32768, .. }),
        "{err}"
    );
    unsafe { m.launch_params("emu_test_big_shared", &LaunchConfig::linear(1, 32), &sp) }.unwrap();
    assert_eq!(out[0], 1.0);
    // static + dynamic beyond the default limit
    let err = unsafe {
        m.launch_params(
            "emu_test_big_shared",
            &LaunchConfig::new([1, 1, 1], [32, 1, 1], 200 * 1024),
            &sp,
        )
    }
    .unwrap_err();
    assert!(
        matches!(
            err,
            EmuError::SharedMemoryLimit {
                dynamic_bytes: 204800,
                ..
            }
        ),
        "{err}"
    );
}
