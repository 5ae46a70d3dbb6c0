//! Offsets past 2^31 elements: every kernel family (causal and non-causal
//! forward by walk and split, their backward by whole-head and tiled walks,
//! varlen, the decode step) runs through the emulator on tensors whose
//! strides put rows more than 2^31 elements from the base, one case each for
//! a large token, batch and head stride, and is compared with the reference.
//!
//! The tensors live in sparse memory: address space reserved with
//! `MAP_NORESERVE`, where only the pages a kernel touches cost RAM (a few MB
//! in all), so each case takes milliseconds. An index product computed in 32
//! bits anywhere reads or writes the wrong row, and the result differs from
//! the reference (or the process faults). The emulator runs the same `.cu`
//! sources as the GPU, so this proves the device index math on any machine.

mod common;

use std::marker::PhantomData;

use common::{ref_opts, tolerance};
use half::f16;
use linattn_kernels::ops::backward::{self, GradLens};
use linattn_kernels::ops::forward::{self, Lens};
use linattn_kernels::RawBackward;
use linattn_kernels::{decode_step_raw, DecodeShape, RawDecode, RowStrides};
use linattn_kernels::{
    AttentionOptions, AttentionShape, Kind, RawForward, ScheduleChoice, Strides,
};
use linattn_kernels::{Element, Emulator};
use linattn_reference::testing::{rel_l2_error, test_seed, Rng};
use linattn_reference::{Layout, State, View};

/// More than `i32::MAX` elements.
const BIG: usize = (1 << 31) + 4096;
/// A token stride that puts token 64 past 2^31 elements.
const BIG_TOKEN: usize = (1 << 25) + 64;

/// Reserved, uncommitted address space: pages appear, zeroed, on first touch.
struct Sparse {
    base: *mut u8,
    bytes: usize,
}

impl Sparse {
    fn reserve(bytes: usize) -> Sparse {
        // SAFETY: a fresh anonymous private mapping (no file, no fixed address);
        // the result is checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert!(
            p != libc::MAP_FAILED,
            "reserving {bytes} bytes of address space failed: {}",
            std::io::Error::last_os_error()
        );
        Sparse {
            base: p.cast(),
            bytes,
        }
    }

    fn addr(&self) -> u64 {
        self.base as u64
    }

    fn set<T: Copy>(&self, i: usize, x: T) {
        assert!(
            (i + 1) * size_of::<T>() <= self.bytes,
            "element {i} outside"
        );
        // SAFETY: in bounds (checked), the mapping is readable and writable,
        // page-aligned and `i` counts whole elements, so the address is aligned.
        unsafe { self.base.cast::<T>().add(i).write(x) }
    }

    fn get<T: Copy>(&self, i: usize) -> T {
        assert!(
            (i + 1) * size_of::<T>() <= self.bytes,
            "element {i} outside"
        );
        // SAFETY: as in `set`; untouched pages read as zeros.
        unsafe { self.base.cast::<T>().add(i).read() }
    }
}

impl Drop for Sparse {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `reserve`, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.bytes) };
    }
}

/// Under strict overcommit accounting (`vm.overcommit_memory = 2`) the
/// kernel ignores MAP_NORESERVE and charges the whole reservation, so these
/// cases cannot run there; anywhere else a failed reservation is an error.
fn strict_overcommit() -> bool {
    std::fs::read_to_string("/proc/sys/vm/overcommit_memory").is_ok_and(|s| s.trim() == "2")
}

/// `batch x heads x tokens` rows of `dim` elements at strides `s`.
#[derive(Debug, Clone, Copy)]
struct Rows {
    batch: usize,
    heads: usize,
    tokens: usize,
    dim: usize,
    s: Strides,
}

impl Rows {
    fn span(&self) -> usize {
        (self.batch - 1) * self.s.batch
            + (self.heads - 1) * self.s.head
            + (self.tokens - 1) * self.s.token
            + self.dim
    }

    /// Element offsets in compact `[B, N, H, dim]` order.
    fn offsets(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.batch).flat_map(move |b| {
            (0..self.tokens).flat_map(move |t| {
                (0..self.heads).flat_map(move |h| {
                    let row = b * self.s.batch + t * self.s.token + h * self.s.head;
                    row..row + self.dim
                })
            })
        })
    }

    fn compact(&self) -> Layout {
        Layout::bnhd(self.batch, self.heads, self.tokens, self.dim)
    }
}

/// One strided tensor of `T` in sparse memory.
struct Tensor<T> {
    mem: Sparse,
    rows: Rows,
    _t: PhantomData<T>,
}

impl<T: Element> Tensor<T> {
    fn new(rows: Rows) -> Self {
        let max = rows.offsets().max().unwrap();
        assert!(max > i32::MAX as usize, "{rows:?} stays below 2^31");
        Tensor {
            mem: Sparse::reserve(rows.span() * size_of::<T>()),
            rows,
            _t: PhantomData,
        }
    }

    /// Random rows; returns what was stored, widened, in compact order.
    fn random(rows: Rows, rng: &mut Rng) -> (Self, Vec<f64>) {
        let t = Self::new(rows);
        let xs = rng.normal_vec(rows.batch * rows.tokens * rows.heads * rows.dim);
        let stored = rows
            .offsets()
            .zip(&xs)
            .map(|(i, &x)| {
                let v = T::from_f64(x);
                t.mem.set(i, v);
                v.to_f64()
            })
            .collect();
        (t, stored)
    }

    /// An output: every row NaN, so an element the kernel skips shows.
    fn poisoned(rows: Rows) -> Self {
        let t = Self::new(rows);
        for i in rows.offsets() {
            t.mem.set(i, T::nan());
        }
        t
    }

    fn gather(&self) -> Vec<f64> {
        self.rows
            .offsets()
            .map(|i| self.mem.get::<T>(i).to_f64())
            .collect()
    }

    fn addr(&self) -> u64 {
        self.mem.addr()
    }
}

/// Which stride carries the tensors past 2^31 elements.
#[derive(Debug, Clone, Copy)]
enum Big {
    Token,
    Batch,
    Head,
}

impl Big {
    const ALL: [Big; 3] = [Big::Token, Big::Batch, Big::Head];

    /// (batch, heads, tokens): 70 tokens cross a chunk boundary.
    fn geometry(self) -> (usize, usize, usize) {
        match self {
            Big::Batch => (2, 2, 70),
            Big::Token | Big::Head => (1, 2, 70),
        }
    }

    fn rows(self, dim: usize) -> Rows {
        let (batch, heads, tokens) = self.geometry();
        let s = match self {
            Big::Token => Strides {
                batch: tokens * BIG_TOKEN,
                token: BIG_TOKEN,
                head: dim,
            },
            Big::Batch => Strides {
                batch: BIG,
                token: heads * dim,
                head: dim,
            },
            Big::Head => Strides {
                batch: heads * BIG,
                token: dim,
                head: BIG,
            },
        };
        Rows {
            batch,
            heads,
            tokens,
            dim,
            s,
        }
    }

    fn shape(self, d: usize, m: usize) -> AttentionShape {
        let (batch, heads, tokens) = self.geometry();
        let (qk, vo) = (self.rows(d).s, self.rows(m).s);
        AttentionShape {
            batch,
            heads,
            tokens,
            d,
            m,
            q: qk,
            k: qk,
            v: vo,
            o: vo,
        }
    }
}

fn emulator() -> Emulator {
    Emulator::unchecked().expect("the emulator is compiled into tests")
}

fn check(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert!(
        got.iter().all(|x| x.is_finite()),
        "{what}: non-finite output"
    );
    let err = rel_l2_error(got, want);
    assert!(err < tol, "{what}: relative error {err:.3e} >= {tol:.0e}");
}

/// The inputs of one case, and their compact widened copies.
struct Qkv<T> {
    q: Tensor<T>,
    k: Tensor<T>,
    v: Tensor<T>,
    q64: Vec<f64>,
    k64: Vec<f64>,
    v64: Vec<f64>,
}

fn qkv<T: Element>(big: Big, d: usize, m: usize, rng: &mut Rng) -> Qkv<T> {
    let (q, q64) = Tensor::random(big.rows(d), rng);
    let (k, k64) = Tensor::random(big.rows(d), rng);
    let (v, v64) = Tensor::random(big.rows(m), rng);
    Qkv {
        q,
        k,
        v,
        q64,
        k64,
        v64,
    }
}

/// The address of a host workspace (0 when empty).
fn host_addr(ws: &mut [f32]) -> u64 {
    if ws.is_empty() {
        0
    } else {
        ws.as_mut_ptr() as u64
    }
}

/// One forward call; `cu` makes it varlen (then `big` must be `Token`, a
/// batch of one).
fn forward_case<T: Element>(
    kind: Kind,
    big: Big,
    d: usize,
    m: usize,
    schedule: ScheduleChoice,
    cu: Option<&[usize]>,
) {
    let what = format!(
        "{kind:?} forward {:?} {big:?} d {d} m {m} {schedule:?} cu {cu:?}",
        T::DTYPE
    );
    let mut rng = Rng::new(test_seed() ^ d as u64 ^ ((m as u64) << 8));
    let x = qkv::<T>(big, d, m, &mut rng);
    let o = Tensor::<T>::poisoned(big.rows(m));
    let shape = big.shape(d, m);
    let opts = AttentionOptions {
        schedule,
        ..AttentionOptions::default()
    };
    let problem = forward::validate(
        "index64",
        T::DTYPE,
        &shape,
        cu,
        &opts,
        &Lens::unknown(false, false),
        &emulator().target(),
    )
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut ws = vec![0f32; forward::workspace_len(kind, &problem, &opts)];
    let cu64: Vec<i64> = cu.unwrap_or(&[]).iter().map(|&c| c as i64).collect();
    let ptrs = RawForward {
        q: x.q.addr(),
        k: x.k.addr(),
        v: x.v.addr(),
        o: o.addr(),
        cu_seqlens: if cu64.is_empty() {
            0
        } else {
            cu64.as_ptr() as u64
        },
        workspace: host_addr(&mut ws),
        workspace_len: ws.len(),
        ..RawForward::default()
    };
    let emu = emulator();
    // SAFETY: every address is host memory covering its strided span (or
    // the workspace length asked for, or the offsets); o overlaps no input.
    unsafe { forward::forward_raw(kind, &emu, T::DTYPE, &ptrs, &shape, cu, &opts) }
        .unwrap_or_else(|e| panic!("{what}: {e}"));

    let (qr, vr) = (big.rows(d), big.rows(m));
    let view = |xs, r: Rows| View::new(xs, r.compact()).unwrap();
    let (q, k, v) = (view(&x.q64, qr), view(&x.k64, qr), view(&x.v64, vr));
    let ro = ref_opts(&opts);
    use linattn_reference as r;
    let (want, _) = match (kind, cu) {
        (Kind::Causal, None) => r::causal_linear_attention(q, k, v, &ro, None),
        (Kind::NonCausal, None) => r::linear_attention(q, k, v, &ro, None),
        (Kind::Causal, Some(cu)) => r::varlen_causal_linear_attention(q, k, v, cu, &ro, None),
        (Kind::NonCausal, Some(cu)) => r::varlen_linear_attention(q, k, v, cu, &ro, None),
    }
    .unwrap();
    // Dense results come back [B, H, N, M]; varlen ones packed, as compact.
    let want = want.to_layout(&vr.compact()).unwrap();
    check(&what, &o.gather(), &want, tolerance::<T>(1e-5, 1e-2, 1e-2));
}

#[test]
fn forward_indexes_past_2_31_elements() {
    if strict_overcommit() {
        eprintln!("skipped: vm.overcommit_memory = 2 charges sparse reservations in full");
        return;
    }
    let walk = ScheduleChoice::Walk;
    let split = ScheduleChoice::Split { parts: 2 };
    for big in Big::ALL {
        for kind in [Kind::Causal, Kind::NonCausal] {
            // 16-bit tensor-core walks and the f32 FMA walk.
            forward_case::<f16>(kind, big, 16, 32, walk, None);
            forward_case::<f32>(kind, big, 12, 20, walk, None);
        }
        // The split causal schedule (partition states, combine, outputs).
        forward_case::<f16>(Kind::Causal, big, 16, 32, split, None);
        forward_case::<f32>(Kind::Causal, big, 12, 20, split, None);
    }
    // Varlen: token offsets from `cu_seqlens` times a large token stride.
    let cu = [0usize, 29, 29, 70];
    for kind in [Kind::Causal, Kind::NonCausal] {
        forward_case::<f16>(kind, Big::Token, 16, 24, walk, Some(&cu));
        forward_case::<f32>(kind, Big::Token, 12, 20, split, Some(&cu));
    }
}

fn backward_case<T: Element>(kind: Kind, big: Big, d: usize, m: usize, schedule: ScheduleChoice) {
    let what = format!(
        "{kind:?} backward {:?} {big:?} d {d} m {m} {schedule:?}",
        T::DTYPE
    );
    let mut rng = Rng::new(test_seed() ^ 0xb0 ^ d as u64 ^ ((m as u64) << 8));
    let x = qkv::<T>(big, d, m, &mut rng);
    let (d_o, do64) = Tensor::<T>::random(big.rows(m), &mut rng);
    let dq = Tensor::<T>::poisoned(big.rows(d));
    let dk = Tensor::<T>::poisoned(big.rows(d));
    let dv = Tensor::<T>::poisoned(big.rows(m));
    let shape = big.shape(d, m);
    let opts = AttentionOptions {
        schedule,
        ..AttentionOptions::default()
    };
    let grads = GradLens::unknown(false, false);
    let bp = backward::validate(
        "index64",
        T::DTYPE,
        &shape,
        None,
        &opts,
        &Lens::unknown(false, false),
        &grads,
        &emulator().target(),
    )
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut ws = vec![0f32; backward::workspace_len(&bp)];
    let ptrs = RawBackward {
        q: x.q.addr(),
        k: x.k.addr(),
        v: x.v.addr(),
        d_o: d_o.addr(),
        dq: dq.addr(),
        dk: dk.addr(),
        dv: dv.addr(),
        workspace: host_addr(&mut ws),
        workspace_len: ws.len(),
        ..RawBackward::default()
    };
    let emu = emulator();
    // SAFETY: as in forward_case; the gradients overlap no input.
    unsafe { backward::backward_raw(kind, &emu, T::DTYPE, &ptrs, &shape, None, &opts) }
        .unwrap_or_else(|e| panic!("{what}: {e}"));

    let view = |xs, r: Rows| View::new(xs, r.compact()).unwrap();
    let (qr, vr) = (big.rows(d), big.rows(m));
    let (q, k, v, g) = (
        view(&x.q64, qr),
        view(&x.k64, qr),
        view(&x.v64, vr),
        view(&do64, vr),
    );
    let ro = ref_opts(&opts);
    let want = match kind {
        Kind::Causal => {
            linattn_reference::causal_linear_attention_backward(q, k, v, g, &ro, None, None)
        }
        Kind::NonCausal => {
            linattn_reference::linear_attention_backward(q, k, v, g, &ro, None, None)
        }
    }
    .unwrap();
    let tol = tolerance::<T>(1e-5, 1e-2, 1e-2);
    for (name, got, want, r) in [
        ("dq", &dq, &want.dq, qr),
        ("dk", &dk, &want.dk, qr),
        ("dv", &dv, &want.dv, vr),
    ] {
        let want = want.to_layout(&r.compact()).unwrap();
        check(&format!("{what} {name}"), &got.gather(), &want, tol);
    }
}

#[test]
fn backward_indexes_past_2_31_elements() {
    if strict_overcommit() {
        eprintln!("skipped: vm.overcommit_memory = 2 charges sparse reservations in full");
        return;
    }
    for big in Big::ALL {
        // 16-bit: the whole-head walks (prep + dq, dk + dv); f32: the tiled passes.
        let auto = ScheduleChoice::Auto;
        backward_case::<f16>(Kind::Causal, big, 16, 32, auto);
        backward_case::<f32>(Kind::Causal, big, 12, 20, auto);
        backward_case::<f16>(Kind::NonCausal, big, 16, 32, auto);
        backward_case::<f32>(Kind::NonCausal, big, 12, 20, auto);
        // The split whole-head walks (partition sums, scans, walks).
        let split = ScheduleChoice::Split { parts: 2 };
        backward_case::<f16>(Kind::Causal, big, 16, 32, split);
        backward_case::<f16>(Kind::NonCausal, big, 16, 32, split);
    }
}

fn decode_case<T: Element>(big: Big, d: usize, m: usize) {
    let what = format!("decode {:?} {big:?} d {d} m {m}", T::DTYPE);
    let mut rng = Rng::new(test_seed() ^ 0xdec ^ d as u64);
    // One token per (batch, head): the token axis of `rows` is unused.
    let one = |dim| Rows {
        tokens: 1,
        ..big.rows(dim)
    };
    let (q, q64) = Tensor::<T>::random(one(d), &mut rng);
    let (k, k64) = Tensor::<T>::random(one(d), &mut rng);
    let (v, v64) = Tensor::<T>::random(one(m), &mut rng);
    let o = Tensor::<T>::poisoned(one(m));
    let row = |dim| {
        let s = one(dim).s;
        RowStrides {
            batch: s.batch,
            head: s.head,
        }
    };
    let (b, h, _) = big.geometry();
    let shape = DecodeShape {
        batch: b,
        heads: h,
        d,
        m,
        q: row(d),
        k: row(d),
        v: row(m),
        o: row(m),
    };
    let mut s: Vec<f32> = rng
        .normal_vec(b * h * d * m)
        .iter()
        .map(|&x| x as f32)
        .collect();
    let mut z: Vec<f32> = rng
        .uniform_vec(b * h * d, 0.5, 3.0)
        .iter()
        .map(|&x| x as f32)
        .collect();
    let mut states: Vec<State<f64>> = (0..b * h)
        .map(|i| State {
            d,
            m,
            s: s[i * d * m..(i + 1) * d * m]
                .iter()
                .map(|&x| x as f64)
                .collect(),
            z: z[i * d..(i + 1) * d].iter().map(|&x| x as f64).collect(),
        })
        .collect();
    let ptrs = RawDecode {
        q: q.addr(),
        k: k.addr(),
        v: v.addr(),
        o: o.addr(),
        state_s: s.as_mut_ptr() as u64,
        state_z: z.as_mut_ptr() as u64,
    };
    let opts = AttentionOptions::default();
    // SAFETY: host memory covering every strided row and b * h states.
    unsafe { decode_step_raw(&emulator(), T::DTYPE, &ptrs, &shape, &opts) }
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    // Rows are in compact [B, 1, H, dim] order, i.e. state order b * H + h.
    let ro = ref_opts(&opts);
    let mut want = Vec::new();
    for (i, st) in states.iter_mut().enumerate() {
        let at = |xs: &[f64], dim: usize| xs[i * dim..(i + 1) * dim].to_vec();
        want.extend(
            linattn_reference::decode_step(st, &at(&q64, d), &at(&k64, d), &at(&v64, m), &ro)
                .unwrap(),
        );
    }
    check(&what, &o.gather(), &want, tolerance::<T>(1e-5, 1e-2, 1e-2));
    let s_want: Vec<f64> = states.iter().flat_map(|st| st.s.clone()).collect();
    let s_got: Vec<f64> = s.iter().map(|&x| x as f64).collect();
    check(&format!("{what} state"), &s_got, &s_want, 1e-5);
}

#[test]
fn decode_indexes_past_2_31_elements() {
    if strict_overcommit() {
        eprintln!("skipped: vm.overcommit_memory = 2 charges sparse reservations in full");
        return;
    }
    // The decode step has no token axis: the batch and head strides.
    for big in [Big::Batch, Big::Head] {
        decode_case::<f16>(big, 16, 32);
        decode_case::<f32>(big, 12, 20);
    }
}
