//! The same model with its attention on the CPU reference and on the
//! project's kernels (run by the CPU emulator; everything else on the CPU)
//! gives the same logits, in prefill and in decode, within the dtype
//! thresholds: f32 relative error < 1e-5, f16/bf16 < 1e-2.

use std::sync::Arc;

use linattn_kernels::{DType, Device, Emulator};
use linattn_model::{
    AttentionKind, Config, CpuAttention, CpuCache, FeatureMap, KernelAttention, Model, ModelError,
    VOCAB,
};
use linattn_reference::testing::{rel_l2_error, test_seed, Rng};

fn emulator() -> Device {
    Device::Emulator(Arc::new(
        Emulator::new().expect("the emulator is compiled in"),
    ))
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn config(feature_map: FeatureMap) -> Config {
    Config {
        d_model: 32,
        heads: 2,
        layers: 2,
        mlp: 64,
        attention: AttentionKind::Linear,
        feature_map,
    }
}

#[test]
fn emulated_kernels_match_the_cpu_reference() {
    let seed = test_seed();
    let mut rng = Rng::new(seed);
    let dev = emulator();
    let tokens: Vec<u8> = (0..24).map(|_| rng.range(0, 255) as u8).collect();
    let k = 17; // prefill 17 (not a multiple of any chunk), decode 7
    for (fm, dtype, tol) in [
        (FeatureMap::EluPlusOne, DType::F32, 1e-5),
        (FeatureMap::Relu, DType::F32, 1e-5),
        (FeatureMap::EluPlusOne, DType::F16, 1e-2),
        (FeatureMap::EluPlusOne, DType::Bf16, 1e-2),
    ] {
        let model = Model::random(config(fm), seed).unwrap();
        let cpu = CpuAttention;
        let kern = KernelAttention::with_dtype(dev.clone(), dtype);

        let want = model.forward(&cpu, &tokens).unwrap();
        let (pre, mut session) = model.prefill(&kern, &tokens[..k]).unwrap();
        let mut got = pre;
        for &t in &tokens[k..] {
            got.extend(model.decode(&kern, &mut session, t).unwrap());
        }
        assert_eq!(got.len(), tokens.len() * VOCAB);
        let err = rel_l2_error(&f64s(&got), &f64s(&want));
        eprintln!("{fm:?} {dtype:?}: rel error {err}");
        assert!(err < tol, "{fm:?} {dtype:?}: rel error {err} >= {tol}");
        for i in k..tokens.len() {
            let row = |x: &[f32]| f64s(&x[i * VOCAB..(i + 1) * VOCAB]);
            let e = rel_l2_error(&row(&got), &row(&want));
            assert!(
                e < tol,
                "{fm:?} {dtype:?}: decoded token {i}: rel error {e}"
            );
        }
        if dtype == DType::F32 {
            // The device-resident states equal the reference's after the run.
            let (_, mut cs) = model.prefill(&cpu, &tokens[..k]).unwrap();
            for &t in &tokens[k..] {
                model.decode(&cpu, &mut cs, t).unwrap();
            }
            for (kc, cc) in session.caches().iter().zip(cs.caches()) {
                let (s, z) = kc.download(&dev).unwrap();
                let CpuCache::Linear(states) = cc else {
                    panic!("linear model, linear cache")
                };
                let s_ref: Vec<f32> = states.iter().flat_map(|st| st.s.clone()).collect();
                let z_ref: Vec<f32> = states.iter().flat_map(|st| st.z.clone()).collect();
                assert!(rel_l2_error(&f64s(&s), &f64s(&s_ref)) < 1e-5);
                assert!(rel_l2_error(&f64s(&z), &f64s(&z_ref)) < 1e-5);
            }
        }
    }
}

#[test]
fn softmax_has_no_kernel_and_says_so() {
    let model = Model::random(
        Config {
            attention: AttentionKind::Softmax,
            ..config(FeatureMap::EluPlusOne)
        },
        0,
    )
    .unwrap();
    let err = model
        .prefill(&KernelAttention::new(emulator()), b"abc")
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, ModelError::InBlock { layer: 0, source } if matches!(**source, ModelError::BackendUnavailable { .. })),
        "{err:?}"
    );
    assert!(msg.contains("softmax attention has no kernel"), "{msg}");
}
