//! Bit-level fingerprints of every linear-attention kernel family on the
//! CPU emulator: a fixed list of cases (forward walk and split, causal and
//! non-causal, f32/f16/bf16, every feature map, normalised or not, varlen,
//! initial and final states; the backward's tiled passes up to D = M = 256,
//! its merged and split whole-head walks, state gradients; the decode step;
//! the feature map) whose outputs (o, final states, dq, dk, dv, dS0, dz0,
//! updated decode states) are hashed (64-bit FNV-1a over the bits) and
//! compared with `tests/fingerprints.txt`.
//!
//! A refactor must leave every line of that file unchanged. A change that is
//! meant to move results (a numerics fix) regenerates it with
//! `LINATTN_FINGERPRINTS_WRITE=1 cargo test --test fingerprints`, and the
//! commit says which cases moved and why. The hashes pin this build's host
//! math library too (the emulator's `expf` is the host's), so a different
//! libm may need a regeneration that changes nothing in the kernels.
//!
//! These are no accuracy checks (tests/forward.rs, tests/backward.rs and
//! the others compare with the f64 reference); they prove that the bits did
//! not move.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use half::{bf16, f16};
use linattn_kernels::{decode_step, DecodeShape};
use linattn_kernels::{feature_map, RowsShape};
use linattn_kernels::{
    AttentionOptions, AttentionShape, Kind, Qkv, ScheduleChoice, StateIo, StateMut, StateRef,
    Strides,
};
use linattn_kernels::{BackwardInputs, BackwardStates, Grads};
use linattn_kernels::{DType, Device, Element, Emulator, F16Tiles, FeatureMap};
use linattn_reference::testing::Rng;

const FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fingerprints.txt");
const WRITE_ENV: &str = "LINATTN_FINGERPRINTS_WRITE";

/// 64-bit FNV-1a over the bits of every output, each prefixed by its length.
#[derive(Debug)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// Elements widen to f64 exactly (f32, f16 and bf16 all embed in f64),
    /// so the f64 bits are the element's bits in another coding.
    /// Every output is poisoned with NaN before the launch and the inputs
    /// keep every result finite, so in a `dense` output (no padding between
    /// rows) a NaN is an element never written.
    fn elems<T: Element>(&mut self, xs: &[T], dense: bool) {
        assert!(
            !dense || xs.iter().all(|x| x.to_f64().is_finite()),
            "an output holds a non-finite element"
        );
        self.bytes(&(xs.len() as u64).to_le_bytes());
        for x in xs {
            self.bytes(&x.to_f64().to_bits().to_le_bytes());
        }
    }
}

/// Inputs in [lo, hi) from the test's own seed, rounded to the dtype
/// (uniform draws only: no transcendental functions on the host side).
fn data<T: Element>(rng: &mut Rng, n: usize, lo: f64, hi: f64) -> Vec<T> {
    (0..n).map(|_| T::from_f64(rng.uniform(lo, hi))).collect()
}

fn data_f32(rng: &mut Rng, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    (0..n).map(|_| rng.uniform(lo, hi) as f32).collect()
}

/// One attention case (forward or backward).
#[derive(Debug, Clone)]
struct Attn {
    name: String,
    kind: Kind,
    b: usize,
    h: usize,
    n: usize,
    d: usize,
    m: usize,
    /// `[B, N, H, dim]` with a padded row (else contiguous `[B, H, N, dim]`).
    strided: bool,
    cu: Option<Vec<usize>>,
    opts: AttentionOptions,
    initial: bool,
    /// Forward: write the final state. Backward: a gradient into it.
    final_state: bool,
}

impl Attn {
    fn new(name: &str, kind: Kind, b: usize, h: usize, n: usize, d: usize, m: usize) -> Self {
        Attn {
            name: name.to_string(),
            kind,
            b,
            h,
            n,
            d,
            m,
            strided: false,
            cu: None,
            opts: AttentionOptions::default(),
            initial: false,
            final_state: false,
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Attn)) -> Self {
        f(&mut self);
        self
    }

    fn states(mut self) -> Self {
        self.initial = true;
        self.final_state = true;
        self
    }

    fn varlen(mut self, cu: &[usize]) -> Self {
        self.b = 1;
        self.n = *cu.last().unwrap();
        self.cu = Some(cu.to_vec());
        self
    }

    fn schedule(mut self, s: ScheduleChoice) -> Self {
        self.opts.schedule = s;
        self
    }

    fn map(mut self, map: FeatureMap, normalize: bool) -> Self {
        self.opts.feature_map = map;
        self.opts.normalize = normalize;
        self
    }

    fn shape(&self) -> AttentionShape {
        if !self.strided && self.cu.is_none() {
            return AttentionShape::bhnd(self.b, self.h, self.n, self.d, self.m);
        }
        let s = |dim: usize| {
            let pad = usize::from(self.strided) * 3;
            Strides::bnhd(self.h, self.n, dim + pad)
        };
        AttentionShape {
            batch: self.b,
            heads: self.h,
            tokens: self.n,
            d: self.d,
            m: self.m,
            q: s(self.d),
            k: s(self.d),
            v: s(self.m),
            o: s(self.m),
        }
    }

    fn seq_heads(&self) -> usize {
        self.cu.as_ref().map_or(self.b, |c| c.len() - 1) * self.h
    }

    /// Elements of a tensor `dim` wide with strides `s`.
    fn span(&self, s: &Strides, dim: usize) -> usize {
        if self.n == 0 {
            return 0;
        }
        (self.b - 1) * s.batch + (self.h - 1) * s.head + (self.n - 1) * s.token + dim
    }
}

/// q, k, v and a state pair for one case, drawn from its name's seed.
struct Drawn<T> {
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    s0: Vec<f32>,
    z0: Vec<f32>,
}

fn seed_of(name: &str) -> u64 {
    let mut h = Fnv::new();
    h.bytes(name.as_bytes());
    h.0
}

fn draw<T: Element>(c: &Attn, rng: &mut Rng) -> Drawn<T> {
    let sh = c.shape();
    let (d, m, states) = (c.d, c.m, c.seq_heads());
    Drawn {
        q: data(rng, c.span(&sh.q, d), -2.0, 2.0),
        k: data(rng, c.span(&sh.k, d), -2.0, 2.0),
        v: data(rng, c.span(&sh.v, m), -3.0, 3.0),
        s0: data_f32(rng, states * d * m, -1.0, 1.0),
        z0: data_f32(rng, states * d, 0.5, 3.0),
    }
}

fn forward<T: Element>(dev: &Device, c: &Attn) -> u64 {
    let mut rng = Rng::new(seed_of(&c.name));
    let x = draw::<T>(c, &mut rng);
    let sh = c.shape();
    let up = |v: &[T]| dev.upload(v).unwrap();
    let up32 = |v: &[f32]| dev.upload(v).unwrap();
    let (q, k, v) = (up(&x.q), up(&x.k), up(&x.v));
    let mut o = up(&vec![T::nan(); c.span(&sh.o, c.m)]);
    let (s0, z0) = (up32(&x.s0), up32(&x.z0));
    let mut s1 = up32(&vec![f32::NAN; x.s0.len()]);
    let mut z1 = up32(&vec![f32::NAN; x.z0.len()]);
    let states = StateIo {
        initial: c.initial.then_some(StateRef { s: &s0, z: &z0 }),
        final_state: c.final_state.then_some(StateMut {
            s: &mut s1,
            z: &mut z1,
        }),
    };
    let qkv = Qkv {
        q: &q,
        k: &k,
        v: &v,
    };
    let cu = c.cu.as_deref();
    linattn_kernels::forward(c.kind, dev, qkv, &mut o, &sh, cu, &c.opts, states)
        .unwrap_or_else(|e| panic!("{}: {e}", c.name));
    let mut h = Fnv::new();
    h.elems(&dev.download(&o).unwrap(), !c.strided);
    if c.final_state {
        h.elems(&dev.download(&s1).unwrap(), true);
        h.elems(&dev.download(&z1).unwrap(), true);
    }
    h.0
}

fn backward<T: Element>(dev: &Device, c: &Attn) -> u64 {
    let mut rng = Rng::new(seed_of(&c.name));
    let x = draw::<T>(c, &mut rng);
    let sh = c.shape();
    let g: Vec<T> = data(&mut rng, c.span(&sh.o, c.m), -1.0, 1.0);
    let gs: Vec<f32> = data_f32(&mut rng, x.s0.len(), -0.5, 0.5);
    let gz: Vec<f32> = data_f32(&mut rng, x.z0.len(), -0.5, 0.5);
    let up = |v: &[T]| dev.upload(v).unwrap();
    let up32 = |v: &[f32]| dev.upload(v).unwrap();
    let (q, k, v, d_o) = (up(&x.q), up(&x.k), up(&x.v), up(&g));
    let nan = |n: usize| up(&vec![T::nan(); n]);
    let (mut dq, mut dk, mut dv) = (
        nan(c.span(&sh.q, c.d)),
        nan(c.span(&sh.k, c.d)),
        nan(c.span(&sh.v, c.m)),
    );
    let (s0, z0, gs, gz) = (up32(&x.s0), up32(&x.z0), up32(&gs), up32(&gz));
    let mut ds0 = up32(&vec![f32::NAN; x.s0.len()]);
    let mut dz0 = up32(&vec![f32::NAN; x.z0.len()]);
    let states = BackwardStates {
        initial: c.initial.then_some(StateRef { s: &s0, z: &z0 }),
        d_final: c.final_state.then_some(StateRef { s: &gs, z: &gz }),
        d_initial: Some(StateMut {
            s: &mut ds0,
            z: &mut dz0,
        }),
    };
    let inputs = BackwardInputs {
        q: &q,
        k: &k,
        v: &v,
        d_o: &d_o,
    };
    let grads = Grads {
        dq: &mut dq,
        dk: &mut dk,
        dv: &mut dv,
    };
    let cu = c.cu.as_deref();
    linattn_kernels::backward(c.kind, dev, inputs, grads, &sh, cu, &c.opts, states)
        .unwrap_or_else(|e| panic!("{}: {e}", c.name));
    let mut h = Fnv::new();
    for t in [&dq, &dk, &dv] {
        h.elems(&dev.download(t).unwrap(), !c.strided);
    }
    h.elems(&dev.download(&ds0).unwrap(), true);
    h.elems(&dev.download(&dz0).unwrap(), true);
    h.0
}

fn decode<T: Element>(
    dev: &Device,
    name: &str,
    shape: &DecodeShape,
    opts: &AttentionOptions,
) -> u64 {
    let mut rng = Rng::new(seed_of(name));
    let (b, h, d, m) = (shape.batch, shape.heads, shape.d, shape.m);
    let q: Vec<T> = data(&mut rng, b * h * d, -2.0, 2.0);
    let k: Vec<T> = data(&mut rng, b * h * d, -2.0, 2.0);
    let v: Vec<T> = data(&mut rng, b * h * m, -3.0, 3.0);
    let s0 = data_f32(&mut rng, b * h * d * m, -1.0, 1.0);
    let z0 = data_f32(&mut rng, b * h * d, 0.5, 3.0);
    let (qb, kb, vb) = (
        dev.upload(&q).unwrap(),
        dev.upload(&k).unwrap(),
        dev.upload(&v).unwrap(),
    );
    let mut o = dev.upload(&vec![T::nan(); b * h * m]).unwrap();
    let mut s = dev.upload(&s0).unwrap();
    let mut z = dev.upload(&z0).unwrap();
    let qkv = Qkv {
        q: &qb,
        k: &kb,
        v: &vb,
    };
    decode_step(dev, qkv, &mut o, &mut s, &mut z, shape, opts)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut hs = Fnv::new();
    hs.elems(&dev.download(&o).unwrap(), true);
    hs.elems(&dev.download(&s).unwrap(), true);
    hs.elems(&dev.download(&z).unwrap(), true);
    hs.0
}

fn phi<T: Element>(dev: &Device, name: &str, shape: &RowsShape, map: FeatureMap) -> u64 {
    let mut rng = Rng::new(seed_of(name));
    let x_len = (shape.rows - 1) * shape.x_row_stride + shape.cols;
    let y_len = (shape.rows - 1) * shape.y_row_stride + shape.cols;
    let x: Vec<T> = data(&mut rng, x_len, -6.0, 6.0);
    let xb = dev.upload(&x).unwrap();
    let mut y = dev.upload(&vec![T::nan(); y_len]).unwrap();
    feature_map(dev, &xb, &mut y, shape, map).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut h = Fnv::new();
    h.elems(&dev.download(&y).unwrap(), true);
    h.0
}

fn by_dtype(
    dt: DType,
    f32: impl FnOnce() -> u64,
    f16: impl FnOnce() -> u64,
    bf16: impl FnOnce() -> u64,
) -> u64 {
    match dt {
        DType::F32 => f32(),
        DType::F16 => f16(),
        DType::Bf16 => bf16(),
    }
}

fn dt_name(dt: DType) -> &'static str {
    match dt {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::Bf16 => "bf16",
    }
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::Bf16];

fn forward_cases() -> Vec<(DType, Attn)> {
    use Kind::{Causal, NonCausal};
    use ScheduleChoice::{Split, Walk};
    let mut out = Vec::new();
    for dt in DTYPES {
        let n = dt_name(dt);
        let mut add = |c: Attn| out.push((dt, c));
        add(Attn::new(
            &format!("fwd-causal-walk-elu-{n}"),
            Causal,
            2,
            2,
            70,
            32,
            24,
        )
        .schedule(Walk)
        .with(|c| c.final_state = true));
        add(Attn::new(
            &format!("fwd-causal-split3-relu-states-{n}"),
            Causal,
            1,
            2,
            150,
            20,
            40,
        )
        .schedule(Split { parts: 3 })
        .map(FeatureMap::Relu, true)
        .states());
        add(Attn::new(
            &format!("fwd-noncausal-walk-identity-raw-{n}"),
            NonCausal,
            2,
            1,
            60,
            16,
            16,
        )
        .schedule(Walk)
        .map(FeatureMap::Identity, false));
        add(Attn::new(
            &format!("fwd-noncausal-split2-elu-states-{n}"),
            NonCausal,
            1,
            3,
            130,
            24,
            17,
        )
        .schedule(Split { parts: 2 })
        .states());
        add(Attn::new(
            &format!("fwd-causal-varlen-states-{n}"),
            Causal,
            1,
            2,
            0,
            32,
            32,
        )
        .varlen(&[0, 5, 5, 40, 97])
        .states());
        add(
            Attn::new(&format!("fwd-causal-d256-{n}"), Causal, 1, 1, 40, 256, 256)
                .with(|c| c.final_state = true),
        );
    }
    out.push((
        DType::F32,
        Attn::new("fwd-noncausal-varlen-f32", NonCausal, 1, 2, 0, 8, 12)
            .varlen(&[0, 1, 33, 33, 70])
            .states(),
    ));
    out.push((
        DType::Bf16,
        Attn::new(
            "fwd-noncausal-varlen-strided-bf16",
            NonCausal,
            1,
            2,
            0,
            40,
            8,
        )
        .varlen(&[0, 17, 90])
        .with(|c| c.strided = true),
    ));
    out.push((
        DType::F16,
        Attn::new("fwd-causal-strided-scale-eps-f16", Causal, 2, 3, 33, 64, 48).with(|c| {
            c.strided = true;
            c.opts.scale = 0.3;
            c.opts.eps = 1e-2;
        }),
    ));
    out.push((
        DType::F32,
        Attn::new("fwd-causal-auto-split-f32", Causal, 1, 1, 600, 16, 16),
    ));
    // f16 inputs on bf16 tiles (`F16Tiles::Bf16`): the walk, causal and
    // non-causal, with states.
    for (kind, name) in [
        (Causal, "fwd-causal-f16-on-bf16-tiles"),
        (NonCausal, "fwd-noncausal-f16-on-bf16-tiles"),
    ] {
        out.push((
            DType::F16,
            Attn::new(name, kind, 1, 2, 90, 24, 40)
                .with(|a| a.opts.f16_tiles = F16Tiles::Bf16)
                .states(),
        ));
    }
    out
}

fn backward_cases() -> Vec<(DType, Attn)> {
    use Kind::{Causal, NonCausal};
    use ScheduleChoice::{Split, Walk};
    let mut out = Vec::new();
    for dt in DTYPES {
        let n = dt_name(dt);
        let mut add = |c: Attn| out.push((dt, c));
        add(Attn::new(
            &format!("bwd-causal-walk-states-{n}"),
            Causal,
            2,
            2,
            70,
            32,
            24,
        )
        .schedule(Walk)
        .states());
        add(Attn::new(
            &format!("bwd-noncausal-walk-relu-{n}"),
            NonCausal,
            1,
            2,
            65,
            20,
            33,
        )
        .schedule(Walk)
        .map(FeatureMap::Relu, true)
        .states());
        add(Attn::new(
            &format!("bwd-causal-tiled-d256-{n}"),
            Causal,
            1,
            1,
            40,
            256,
            256,
        )
        .states());
        add(
            Attn::new(&format!("bwd-causal-varlen-{n}"), Causal, 1, 2, 0, 16, 24)
                .varlen(&[0, 3, 3, 50, 81])
                .states(),
        );
    }
    for dt in [DType::F16, DType::Bf16] {
        let n = dt_name(dt);
        out.push((
            dt,
            Attn::new(
                &format!("bwd-causal-split3-states-{n}"),
                Causal,
                1,
                2,
                200,
                32,
                32,
            )
            .schedule(Split { parts: 3 })
            .states(),
        ));
        out.push((
            dt,
            Attn::new(
                &format!("bwd-noncausal-split2-states-{n}"),
                NonCausal,
                1,
                1,
                150,
                16,
                40,
            )
            .schedule(Split { parts: 2 })
            .states(),
        ));
    }
    // f16 inputs on bf16 tiles (`F16Tiles::Bf16`): the whole-head walks,
    // causal and non-causal, elu+1 (phi(k) split on a one-tile head).
    for (kind, name, d) in [
        (Causal, "bwd-causal-f16-on-bf16-tiles", 8),
        (NonCausal, "bwd-noncausal-f16-on-bf16-tiles", 40),
    ] {
        out.push((
            DType::F16,
            Attn::new(name, kind, 1, 2, 90, d, d)
                .with(|a| a.opts.f16_tiles = F16Tiles::Bf16)
                .states(),
        ));
    }
    out.push((
        DType::Bf16,
        Attn::new(
            "bwd-noncausal-tiled-d256-bf16",
            NonCausal,
            1,
            1,
            36,
            256,
            256,
        )
        .states(),
    ));
    out.push((
        DType::F16,
        Attn::new("bwd-causal-raw-relu-f16", Causal, 2, 1, 50, 24, 16).map(FeatureMap::Relu, false),
    ));
    out.push((
        DType::F32,
        Attn::new(
            "bwd-noncausal-identity-raw-strided-f32",
            NonCausal,
            2,
            2,
            30,
            12,
            20,
        )
        .map(FeatureMap::Identity, false)
        .with(|c| c.strided = true),
    ));
    out.push((
        DType::Bf16,
        Attn::new("bwd-causal-scale-eps-bf16", Causal, 1, 2, 45, 48, 64).with(|c| {
            c.opts.scale = 0.3;
            c.opts.eps = 1e-2;
        }),
    ));
    out
}

fn run_all() -> BTreeMap<String, u64> {
    let dev = Device::Emulator(Arc::new(Emulator::unchecked().expect("the emulator")));
    let mut out = BTreeMap::new();
    let mut put = |name: String, h: u64| {
        assert!(
            out.insert(name.clone(), h).is_none(),
            "duplicate case {name}"
        );
    };
    for (dt, c) in forward_cases() {
        let h = by_dtype(
            dt,
            || forward::<f32>(&dev, &c),
            || forward::<f16>(&dev, &c),
            || forward::<bf16>(&dev, &c),
        );
        put(c.name, h);
    }
    for (dt, c) in backward_cases() {
        let h = by_dtype(
            dt,
            || backward::<f32>(&dev, &c),
            || backward::<f16>(&dev, &c),
            || backward::<bf16>(&dev, &c),
        );
        put(c.name, h);
    }
    let maps = [
        (FeatureMap::EluPlusOne, true, "elu"),
        (FeatureMap::Relu, true, "relu"),
        (FeatureMap::Identity, false, "identity-raw"),
    ];
    for dt in DTYPES {
        for (i, (map, normalize, mname)) in maps.into_iter().enumerate() {
            let opts = AttentionOptions {
                feature_map: map,
                normalize,
                ..AttentionOptions::default()
            };
            let (d, m) = [(32, 24), (7, 40), (64, 64)][i];
            let shape = DecodeShape::contiguous(2, 3, d, m);
            let name = format!("decode-{mname}-{}", dt_name(dt));
            let h = by_dtype(
                dt,
                || decode::<f32>(&dev, &name, &shape, &opts),
                || decode::<f16>(&dev, &name, &shape, &opts),
                || decode::<bf16>(&dev, &name, &shape, &opts),
            );
            put(name, h);
        }
        let shape = DecodeShape::contiguous(1, 2, 256, 256);
        let name = format!("decode-d256-{}", dt_name(dt));
        let opts = AttentionOptions::default();
        let h = by_dtype(
            dt,
            || decode::<f32>(&dev, &name, &shape, &opts),
            || decode::<f16>(&dev, &name, &shape, &opts),
            || decode::<bf16>(&dev, &name, &shape, &opts),
        );
        put(name, h);
        for (map, _, mname) in maps {
            let shape = RowsShape {
                rows: 37,
                cols: 1100,
                x_row_stride: 1103,
                y_row_stride: 1100,
            };
            let name = format!("feature-map-{mname}-{}", dt_name(dt));
            let h = by_dtype(
                dt,
                || phi::<f32>(&dev, &name, &shape, map),
                || phi::<f16>(&dev, &name, &shape, map),
                || phi::<bf16>(&dev, &name, &shape, map),
            );
            put(name, h);
        }
    }
    out
}

#[test]
fn outputs_match_the_recorded_fingerprints() {
    let got = run_all();
    assert!(got.len() >= 40, "only {} cases", got.len());
    let mut text = String::new();
    for (name, h) in &got {
        writeln!(text, "{name} {h:016x}").unwrap();
    }
    if std::env::var(WRITE_ENV).is_ok_and(|v| v == "1") {
        std::fs::write(FILE, &text).unwrap();
        eprintln!("wrote {} fingerprints to {FILE}", got.len());
        return;
    }
    let recorded = std::fs::read_to_string(FILE)
        .unwrap_or_else(|e| panic!("{FILE}: {e} (write it with {WRITE_ENV}=1)"));
    let want: BTreeMap<&str, &str> = recorded
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.split_once(' ')
                .unwrap_or_else(|| panic!("bad line {l:?} in {FILE}"))
        })
        .collect();
    let mut bad = Vec::new();
    for (name, h) in &got {
        let h = format!("{h:016x}");
        match want.get(name.as_str()) {
            Some(w) if *w == h => {}
            Some(w) => bad.push(format!("{name}: recorded {w}, now {h}")),
            None => bad.push(format!("{name}: not recorded (now {h})")),
        }
    }
    for name in want.keys() {
        if !got.contains_key(*name) {
            bad.push(format!("{name}: recorded but no longer run"));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} fingerprints differ (regenerate with {WRITE_ENV}=1 only for an intended change):\n{}",
        bad.len(),
        got.len(),
        bad.join("\n")
    );
}
