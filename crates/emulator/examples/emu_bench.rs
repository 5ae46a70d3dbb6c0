//! Measures the emulator: fiber switch cost and an emulated causal linear-attention
//! scan against a plain scalar Rust loop doing the same math.
//!
//! ```text
//! cargo run --release -p linattn-emulator --features test-kernels --example emu_bench
//! ```

use std::time::Instant;

use linattn_emulator::{test_kernels, LaunchConfig};

#[repr(C)]
struct SwitchParams {
    iters: i32,
    out: *mut i32,
}

#[repr(C)]
struct ScanParams {
    q: *const f32,
    k: *const f32,
    v: *const f32,
    out: *mut f32,
    n: i32,
    d: i32,
    m: i32,
}

#[allow(clippy::too_many_arguments)]
fn scalar_scan(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    bh: usize,
    n: usize,
    d: usize,
    m: usize,
) {
    let mut s = vec![0f32; d * m];
    let mut z = vec![0f32; d];
    for b in 0..bh {
        s.iter_mut().for_each(|x| *x = 0.0);
        z.iter_mut().for_each(|x| *x = 0.0);
        let (q, k, v) = (&q[b * n * d..], &k[b * n * d..], &v[b * n * m..]);
        let out = &mut out[b * n * m..];
        for t in 0..n {
            let (qt, kt, vt) = (
                &q[t * d..(t + 1) * d],
                &k[t * d..(t + 1) * d],
                &v[t * m..(t + 1) * m],
            );
            for col in 0..m {
                let mut num = 0f32;
                let mut den = 0f32;
                for i in 0..d {
                    let sv = s[i * m + col] + kt[i] * vt[col];
                    s[i * m + col] = sv;
                    num += qt[i] * sv;
                }
                for i in 0..d {
                    den += qt[i] * (z[i] + kt[i]);
                }
                out[t * m + col] = num / (den + 1e-6);
            }
            for i in 0..d {
                z[i] += kt[i];
            }
        }
    }
}

/// Results: (ns per fiber switch, emulated scan seconds, scalar scan seconds, max abs diff).
pub fn measure() -> (f64, f64, f64, f32) {
    let module = test_kernels::module();
    // Fiber switches: one block of 256 threads passing 10_000 barriers.
    let threads = 256u32;
    let iters = 10_000;
    let mut out = [0i32; 1];
    let p = SwitchParams {
        iters,
        out: out.as_mut_ptr(),
    };
    let cfg = LaunchConfig::linear(1, threads);
    unsafe {
        module.launch_params(
            "emu_test_switch_bench",
            &cfg,
            &SwitchParams {
                iters: 10,
                out: out.as_mut_ptr(),
            },
        )
    }
    .unwrap();
    let t0 = Instant::now();
    unsafe { module.launch_params("emu_test_switch_bench", &cfg, &p) }.unwrap();
    let el = t0.elapsed().as_secs_f64();
    assert_eq!(out[0], iters);
    // each barrier: every thread suspends (1 switch) and is resumed (1 switch)
    let switch_ns = el * 1e9 / (threads as f64 * (iters as f64 + 1.0) * 2.0);

    // Causal scan: B*H = 8, N = 256, D = M = 64.
    let (bh, n, d, m) = (8usize, 256usize, 64usize, 64usize);
    let mut x = 0x2545_f491u32;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        (x as f32 / u32::MAX as f32) + 0.01
    };
    let q: Vec<f32> = (0..bh * n * d).map(|_| rnd()).collect();
    let k: Vec<f32> = (0..bh * n * d).map(|_| rnd()).collect();
    let v: Vec<f32> = (0..bh * n * m).map(|_| rnd() - 0.5).collect();
    let mut out_emu = vec![0f32; bh * n * m];
    let mut out_ref = vec![0f32; bh * n * m];
    let p = ScanParams {
        q: q.as_ptr(),
        k: k.as_ptr(),
        v: v.as_ptr(),
        out: out_emu.as_mut_ptr(),
        n: n as i32,
        d: d as i32,
        m: m as i32,
    };
    let cfg = LaunchConfig::new([bh as u32, 1, 1], [m as u32, 1, 1], (d * m + 3 * d) * 4);
    unsafe { module.launch_params("emu_test_causal_scan", &cfg, &p) }.unwrap(); // warm-up
    let reps = 5;
    let t0 = Instant::now();
    for _ in 0..reps {
        unsafe { module.launch_params("emu_test_causal_scan", &cfg, &p) }.unwrap();
    }
    let emu = t0.elapsed().as_secs_f64() / reps as f64;
    scalar_scan(&q, &k, &v, &mut out_ref, bh, n, d, m);
    let t0 = Instant::now();
    for _ in 0..reps {
        scalar_scan(&q, &k, &v, &mut out_ref, bh, n, d, m);
    }
    let scalar = t0.elapsed().as_secs_f64() / reps as f64;
    let diff = out_emu
        .iter()
        .zip(&out_ref)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    (switch_ns, emu, scalar, diff)
}

fn main() {
    let workers = std::env::var("LINATTN_EMU_THREADS").unwrap_or_else(|_| "default".into());
    let (switch_ns, emu, scalar, diff) = measure();
    println!("fiber switch: {switch_ns:.1} ns per switch (256 threads x 10000 __syncthreads)");
    println!(
        "causal scan B*H=8 N=256 D=M=64: emulated {:.2} ms (LINATTN_EMU_THREADS={workers}), scalar Rust {:.2} ms, ratio {:.2}x, max |diff| {diff:e}",
        emu * 1e3,
        scalar * 1e3,
        emu / scalar
    );
}
