//! Half/bf16 conversions and wmma against plain Rust.

mod common;

use common::DevBuf;
use half::{bf16, f16};
use linattn_emulator::{test_kernels, LaunchConfig};

#[repr(C)]
struct ConvParams {
    input: *const f32,
    half_bits: *mut u16,
    bf16_bits: *mut u16,
    half_back: *mut f32,
    bf16_back: *mut f32,
    din: *const f64,
    half_from_double: *mut u16,
    n: u32,
}

fn conversion_inputs() -> (Vec<f32>, Vec<f64>) {
    let mut v: Vec<f32> = vec![
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7fa0_0001), // signalling NaN payload
        f32::MIN_POSITIVE,
        f32::from_bits(1), // float subnormals
        -f32::from_bits(0x0040_0000),
        65504.0,
        65519.99,
        65520.0,
        -65520.0,
        1e10,
        f32::MAX,
        5.960_464_5e-8, // 2^-24, smallest half subnormal
        2.980_232_2e-8, // 2^-25: tie to zero
        2.980_233e-8,
        8.940_697e-8, // 1.5 * 2^-24: tie to even (2 * 2^-24)
    ];
    // Every finite half, the midpoints to its neighbour (ties) and one float ulp
    // either side of each midpoint; the same for the bf16 grid.
    for h in 0u16..0x7c00 {
        for sign in [0u16, 0x8000] {
            let a = f16::from_bits(h | sign).to_f32();
            let b = f16::from_bits((h + 1) | sign).to_f32();
            let mid = (a as f64 + b as f64) / 2.0;
            let mid = mid as f32;
            v.extend([
                a,
                mid,
                f32::from_bits(mid.to_bits() + 1),
                f32::from_bits(mid.to_bits() - 1),
            ]);
        }
    }
    let mut x = 0x1234_5678u32;
    for _ in 0..100_000 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.push(f32::from_bits(x));
        let bmid = f32::from_bits((x & 0xffff_0000) | 0x8000); // bf16 tie
        v.push(bmid);
    }
    let d: Vec<f64> = v
        .iter()
        .enumerate()
        .map(|(i, &f)| {
            let f = f as f64;
            // nudge below float precision so that rounding through float would be wrong
            match i % 3 {
                0 => f,
                1 => f * (1.0 + 1e-12),
                _ => f * (1.0 - 1e-12),
            }
        })
        .collect();
    (v, d)
}

/// Whether `bits` is `d` rounded to nearest-even half. (The half crate's `from_f64`
/// rounds some values just above a subnormal midpoint down, so it is no reference.)
fn is_correctly_rounded_half(d: f64, bits: u16) -> bool {
    let r = f16::from_bits(bits);
    if d.is_nan() {
        return r.is_nan();
    }
    if d.abs() >= 65520.0 {
        return r.is_infinite() && (r.is_sign_negative() == (d < 0.0));
    }
    if r.is_infinite() || r.is_nan() {
        return false;
    }
    let mag = bits & 0x7fff;
    let err = (d - r.to_f64()).abs();
    let neighbour = |m: u16| f16::from_bits(m | (bits & 0x8000)).to_f64();
    let below = if mag > 0 {
        (d - neighbour(mag - 1)).abs()
    } else {
        f64::INFINITY
    };
    let above = if mag < 0x7bff {
        (d - neighbour(mag + 1)).abs()
    } else {
        f64::INFINITY
    };
    if d != 0.0 && (d < 0.0) != (bits & 0x8000 != 0) && mag != 0 {
        return false;
    }
    err < below && err < above || (err == below.min(above) && mag % 2 == 0) || (err == 0.0)
}

#[test]
fn half_and_bf16_conversions_match_the_half_crate() {
    let (input, din) = conversion_inputs();
    let n = input.len();
    let mut hb = vec![0u16; n];
    let mut bb = vec![0u16; n];
    let mut hd = vec![0u16; n];
    let mut hback = vec![0f32; 65536];
    let mut bback = vec![0f32; 65536];
    let p = ConvParams {
        input: input.as_ptr(),
        half_bits: hb.as_mut_ptr(),
        bf16_bits: bb.as_mut_ptr(),
        half_back: hback.as_mut_ptr(),
        bf16_back: bback.as_mut_ptr(),
        din: din.as_ptr(),
        half_from_double: hd.as_mut_ptr(),
        n: n as u32,
    };
    let blocks = n.max(65536).div_ceil(256) as u32;
    unsafe {
        test_kernels::module().launch_params(
            "emu_test_conversions",
            &LaunchConfig::linear(blocks, 256),
            &p,
        )
    }
    .unwrap();
    let mut checked = 0;
    for i in 0..n {
        let x = input[i];
        let h = f16::from_f32(x);
        if h.is_nan() {
            assert!(f16::from_bits(hb[i]).is_nan(), "half of NaN {x:e}");
        } else {
            assert_eq!(
                hb[i],
                h.to_bits(),
                "__float2half_rn({x:e}) [{:#x}]",
                x.to_bits()
            );
        }
        let b = bf16::from_f32(x);
        if b.is_nan() {
            assert!(bf16::from_bits(bb[i]).is_nan(), "bf16 of NaN");
        } else {
            assert_eq!(
                bb[i],
                b.to_bits(),
                "__float2bfloat16_rn({x:e}) [{:#x}]",
                x.to_bits()
            );
        }
        assert!(
            is_correctly_rounded_half(din[i], hd[i]),
            "__double2half({:e}) = {:#x}",
            din[i],
            hd[i]
        );
        checked += 1;
    }
    assert!(checked > 300_000);
    for bits in 0..=u16::MAX {
        let h = f16::from_bits(bits).to_f32();
        let b = bf16::from_bits(bits).to_f32();
        let (eh, eb) = (hback[bits as usize], bback[bits as usize]);
        if h.is_nan() {
            assert!(eh.is_nan());
        } else {
            assert_eq!(eh.to_bits(), h.to_bits(), "__half2float({bits:#x})");
        }
        if b.is_nan() {
            assert!(eb.is_nan());
        } else {
            assert_eq!(eb.to_bits(), b.to_bits(), "__bfloat162float({bits:#x})");
        }
    }
}

#[repr(C)]
struct WmmaParams {
    a: *const u16,
    b: *const u16,
    c: *mut f32,
    a16: *const u16,
    b16: *const u16,
    c16: *mut f32,
    m: i32,
    n: i32,
    k: i32,
    b_col_major: i32,
    scale: f32,
}

fn run_gemm(
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    col_major_b: bool,
) -> (Vec<f32>, Vec<f32>) {
    let ah: Vec<u16> = a.iter().map(|&x| f16::from_f32(x).to_bits()).collect();
    // b is K x N row-major; for the col-major variant store its transpose.
    let bh: Vec<u16> = if col_major_b {
        (0..n)
            .flat_map(|j| (0..k).map(move |kk| (kk, j)))
            .map(|(kk, j)| f16::from_f32(b[kk * n + j]).to_bits())
            .collect()
    } else {
        b.iter().map(|&x| f16::from_f32(x).to_bits()).collect()
    };
    let a16: Vec<u16> = a.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
    let b16: Vec<u16> = b.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
    // wmma needs 32-byte aligned tiles: device-like (256-byte aligned) buffers.
    let (ah, bh) = (DevBuf::from_slice(&ah), DevBuf::from_slice(&bh));
    let (a16, b16) = (DevBuf::from_slice(&a16), DevBuf::from_slice(&b16));
    let mut c = DevBuf::filled(f32::NAN, m * n);
    let mut c16 = DevBuf::filled(f32::NAN, m * n);
    let p = WmmaParams {
        a: ah.as_ptr(),
        b: bh.as_ptr(),
        c: c.as_mut_ptr(),
        a16: a16.as_ptr(),
        b16: b16.as_ptr(),
        c16: c16.as_mut_ptr(),
        m: m as i32,
        n: n as i32,
        k: k as i32,
        b_col_major: col_major_b as i32,
        scale: 1.0,
    };
    // 4 warps per block, one 16x16 tile per warp.
    let tiles = (m / 16) * (n / 16);
    let cfg = LaunchConfig::linear(tiles.div_ceil(4) as u32, 128);
    unsafe { test_kernels::module().launch_params("emu_test_wmma_gemm", &cfg, &p) }.unwrap();
    let (c, c16) = (c.to_vec(), c16.to_vec());
    // c16 was stored column-major: transpose back.
    let c16t: Vec<f32> = (0..m)
        .flat_map(|i| (0..n).map(move |j| (i, j)))
        .map(|(i, j)| c16[j * m + i])
        .collect();
    (c, c16t)
}

fn plain_gemm(
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    round: fn(f32) -> f32,
) -> Vec<f64> {
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k)
                .map(|kk| round(a[i * k + kk]) as f64 * round(b[kk * n + j]) as f64)
                .sum();
        }
    }
    c
}

#[test]
fn wmma_gemm_is_exact_for_small_integers() {
    let (m, n, k) = (32, 32, 32);
    let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 9) as f32 - 4.0).collect();
    let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
    let want = plain_gemm(&a, &b, m, n, k, |x| x);
    for col_major in [false, true] {
        let (c, c16) = run_gemm(&a, &b, m, n, k, col_major);
        for i in 0..m * n {
            assert_eq!(
                c[i] as f64, want[i],
                "half wmma element {i} (col_major_b={col_major})"
            );
            assert_eq!(c16[i] as f64, want[i], "bf16 wmma element {i}");
        }
    }
}

#[test]
fn wmma_gemm_random_fp16_is_tight() {
    let (m, n, k) = (32, 48, 64);
    let mut x = 0x9e37_79b9u32;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        (x as f32 / u32::MAX as f32) * 2.0 - 1.0
    };
    let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
    let b: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
    let want = plain_gemm(&a, &b, m, n, k, |x| f16::from_f32(x).to_f32());
    let want16 = plain_gemm(&a, &b, m, n, k, |x| bf16::from_f32(x).to_f32());
    let (c, c16) = run_gemm(&a, &b, m, n, k, false);
    for i in 0..m * n {
        // sum of |a||b| bounds the accumulated rounding error
        let row = i / n;
        let col = i % n;
        let mag: f64 = (0..k)
            .map(|kk| (a[row * k + kk] as f64 * b[kk * n + col] as f64).abs())
            .sum();
        let tol = mag * 1e-6 + 1e-12;
        assert!(
            (c[i] as f64 - want[i]).abs() <= tol,
            "half {i}: {} vs {}",
            c[i],
            want[i]
        );
        assert!(
            (c16[i] as f64 - want16[i]).abs() <= tol,
            "bf16 {i}: {} vs {}",
            c16[i],
            want16[i]
        );
    }
}

#[repr(C)]
struct FragCountParams {
    out: *mut i32,
}

#[test]
fn fragment_element_counts_match_sm80() {
    let mut out = [0i32; 4];
    let p = FragCountParams {
        out: out.as_mut_ptr(),
    };
    unsafe {
        test_kernels::module().launch_params(
            "emu_test_fragment_sizes",
            &LaunchConfig::linear(1, 32),
            &p,
        )
    }
    .unwrap();
    assert_eq!(out, [16, 16, 8, 8]);
}
