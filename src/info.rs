//! `linattn info`: what was built and what this machine can run.

use std::fmt::Write as _;

use linattn_kernels::{build_status, ptxas_report, BuildStatus};

/// The full report as text. Never fails: every missing piece is described.
pub fn report() -> String {
    let mut s = String::new();
    let _ = writeln!(s, "linattn {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(
        s,
        "params layout version: {}",
        linattn_kernels::params::PARAMS_VERSION
    );
    match build_status() {
        BuildStatus::Built {
            archs,
            ptx_arch,
            nvcc,
        } => {
            let sass: Vec<String> = archs.iter().map(|a| format!("sm_{a}")).collect();
            let _ = writeln!(s, "device code: built with {nvcc}");
            let _ = writeln!(
                s,
                "  SASS for {}; PTX for compute_{ptx_arch} (JIT on newer GPUs)",
                sass.join(", ")
            );
            let _ = writeln!(
                s,
                "  modules: {}",
                linattn_kernels::embedded_modules()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        BuildStatus::NotBuilt(reason) => {
            let _ = writeln!(s, "device code: not built ({reason})");
            let _ = writeln!(
                s,
                "  GPU calls return Error::KernelsNotBuilt; see README for installing nvcc"
            );
        }
    }
    let _ = writeln!(
        s,
        "CPU emulator compiled in: {}",
        if linattn_kernels::EMULATOR_BUILT {
            "yes"
        } else {
            "no (feature `emulator`)"
        }
    );
    let report = ptxas_report();
    if !report.is_empty() {
        let _ = writeln!(s, "\nptxas resources (per thread registers, stack and spills in bytes, static smem per block):");
        let _ = writeln!(
            s,
            "  {:<34} {:<6} {:>5} {:>6} {:>7} {:>7} {:>7}",
            "kernel", "arch", "regs", "stack", "spill-st", "spill-ld", "smem"
        );
        for r in report {
            let _ = writeln!(
                s,
                "  {:<34} {:<6} {:>5} {:>6} {:>7} {:>7} {:>7}",
                r.kernel,
                r.arch,
                r.registers,
                r.stack_bytes,
                r.spill_store_bytes,
                r.spill_load_bytes,
                r.static_smem_bytes
            );
        }
    }
    let _ = writeln!(s);
    if !linattn_kernels::driver_present() {
        let _ = writeln!(
            s,
            "driver: not found (libcuda could not be loaded); GPU execution unavailable"
        );
        return s;
    }
    match linattn_kernels::device_count() {
        Err(e) => {
            let _ = writeln!(s, "driver: present, but no device: {e}");
        }
        Ok(0) => {
            let _ = writeln!(s, "driver: present, 0 devices");
        }
        Ok(n) => {
            let _ = writeln!(s, "driver: present, {n} device(s)");
            for i in 0..n {
                match linattn_kernels::Gpu::new(i) {
                    Ok(g) => {
                        let info = g.info();
                        let _ = writeln!(
                            s,
                            "  [{i}] {} compute {}.{} memory {:.1} GiB",
                            info.name,
                            info.compute_capability.0,
                            info.compute_capability.1,
                            info.total_memory as f64 / (1u64 << 30) as f64
                        );
                    }
                    Err(e) => {
                        let _ = writeln!(s, "  [{i}] unavailable: {e}");
                    }
                }
            }
        }
    }
    s
}
