//! Peak memory of the CPU path, forward and backward, at B = 1, H = 8,
//! N = 65536 (or the first argument), D = M = 64, f32: prints the process's
//! peak resident set (VmHWM, Linux) against the bytes of q, k, v, o and
//! their gradients. An N x N score matrix per head would be 16 GiB here.
//!
//! `cargo run --release -p linattn-candle --example peak_memory [N]`

use candle_core::{Device, Tensor, Var};
use linattn_candle::{linear_attention, AttentionOptions, QkvLayout};

fn vm(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|x| x.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(65536);
    let (b, h, d, m) = (1, 8, 64, 64);
    let mib = |x: u64| x as f64 / (1 << 20) as f64;
    let dev = Device::Cpu;
    let base = vm("VmRSS:");
    let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, n, d), &dev)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, n, d), &dev)?)?;
    let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, n, m), &dev)?)?;
    let w = Tensor::randn(0f32, 1.0, (b, h, n, m), &dev)?; // dL/do
    let inputs = vm("VmHWM:");
    let o = linear_attention(
        q.as_tensor(),
        k.as_tensor(),
        v.as_tensor(),
        QkvLayout::Bhnd,
        true,
        &AttentionOptions::default(),
    )?;
    let after_fwd = vm("VmHWM:");
    let grads = (&o * &w)?.sum_all()?.backward()?;
    let after_bwd = vm("VmHWM:");
    let dq = grads.get(q.as_tensor()).ok_or("no dq")?;
    assert!(dq.sum_all()?.to_scalar::<f32>()?.is_finite());
    let one = (b * h * n * d * 4) as u64;
    println!(
        "B=1 H=8 N={n} D=M=64 f32; one [B,H,N,64] tensor = {:.0} MiB",
        mib(one)
    );
    println!(
        "q, k, v, dL/do (inputs): {:.0} MiB resident above start",
        mib(inputs - base)
    );
    println!(
        "peak after forward: {:.0} MiB above start (inputs + o = {:.0} MiB)",
        mib(after_fwd - base),
        mib(5 * one)
    );
    println!(
        "peak after backward: {:.0} MiB above start; q, k, v, o, dL/do, dq, dk, dv = {:.0} MiB; ratio {:.2}",
        mib(after_bwd - base),
        mib(8 * one),
        (after_bwd - base) as f64 / (8 * one) as f64
    );
    Ok(())
}
