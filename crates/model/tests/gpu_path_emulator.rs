//! The device-resident model (`GpuModel`: embedding, LayerNorm, GELU and
//! residual kernels, linear-attention or softmax kernels, projections) run
//! on the CPU emulator gives the CPU model's logits, in prefill and in
//! decode, for both attention kinds: relative error < 1e-5 per token.
//! (On the emulator the projections use the CPU model's own GEMM; on a GPU
//! they go through cuBLAS, which this machine cannot run.)

use std::sync::Arc;

use linattn_kernels::{Device, Emulator};
use linattn_model::{
    AttentionKind, Config, CpuAttention, FeatureMap, GpuModel, Model, Sampling, VOCAB,
};
use linattn_reference::testing::{rel_l2_error, test_seed};

fn emulator() -> Device {
    Device::Emulator(Arc::new(
        Emulator::checked().expect("the emulator is compiled in"),
    ))
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn check(attention: AttentionKind, feature_map: FeatureMap) {
    let config = Config {
        d_model: 32,
        heads: 2,
        layers: 2,
        mlp: 64,
        attention,
        feature_map,
    };
    let model = Model::random(config, test_seed()).unwrap();
    let gpu = GpuModel::new(&model, emulator()).unwrap();
    // 21 tokens: a softmax cache of 16 (the prompt rounded up) grows once.
    let text = b"linear attention, rnn";
    let prompt = 11;
    let cpu = CpuAttention;

    // Prefill logits.
    let (want, mut cpu_session) = model.prefill(&cpu, &text[..prompt]).unwrap();
    let (got, mut session) = gpu.prefill(&text[..prompt]).unwrap();
    assert_eq!(got.len(), prompt * VOCAB);
    let err = rel_l2_error(&f64s(&got), &f64s(&want));
    assert!(err < 1e-5, "{attention} prefill: rel error {err:e}");
    eprintln!("{attention} {feature_map:?} prefill: rel error {err:.2e}");

    // Decode steps, each against the CPU model's decode of the same token.
    for (i, &t) in text.iter().enumerate().skip(prompt) {
        let want = model.decode(&cpu, &mut cpu_session, t).unwrap();
        let got = gpu.decode(&mut session, t).unwrap();
        let err = rel_l2_error(&f64s(&got), &f64s(&want));
        assert!(
            err < 1e-5,
            "{attention} decode token {i}: rel error {err:e}"
        );
        eprintln!("{attention} {feature_map:?} decode {i}: rel error {err:.2e}");
    }
    assert_eq!(session.position(), text.len());
}

#[test]
fn linear_attention_model_on_the_device_path_matches_cpu() {
    check(AttentionKind::Linear, FeatureMap::EluPlusOne);
}

#[test]
fn softmax_attention_model_on_the_device_path_matches_cpu() {
    check(AttentionKind::Softmax, FeatureMap::EluPlusOne);
}

#[test]
fn device_path_rejects_bad_input() {
    let model = Model::random(
        Config {
            d_model: 16,
            heads: 2,
            layers: 1,
            mlp: 32,
            ..Config::default()
        },
        1,
    )
    .unwrap();
    let gpu = GpuModel::new(&model, emulator()).unwrap();
    let e = gpu.prefill(b"").unwrap_err().to_string();
    assert!(e.contains("no tokens"), "{e}");
    // A session from a deeper model does not fit.
    let deeper = Model::random(
        Config {
            d_model: 16,
            heads: 2,
            layers: 2,
            mlp: 32,
            ..Config::default()
        },
        1,
    )
    .unwrap();
    let (_, mut s) = GpuModel::new(&deeper, emulator())
        .unwrap()
        .prefill(b"ab")
        .unwrap();
    let e = gpu.decode(&mut s, b'c').unwrap_err().to_string();
    assert!(e.contains("block caches"), "{e}");
}

#[test]
fn device_path_generates_the_cpu_text() {
    for attention in [AttentionKind::Linear, AttentionKind::Softmax] {
        let config = Config {
            d_model: 32,
            heads: 2,
            layers: 1,
            mlp: 64,
            attention,
            ..Config::default()
        };
        let model = Model::random(config, 9).unwrap();
        let gpu = GpuModel::new(&model, emulator()).unwrap();
        let want = model
            .generate(&CpuAttention, b"Once", 6, Sampling::Greedy, 3)
            .unwrap();
        let got = gpu.generate(b"Once", 6, Sampling::Greedy, 3).unwrap();
        let tempered = model
            .generate(&CpuAttention, b"Once", 6, Sampling::Temperature(0.8), 5)
            .unwrap();
        let gpu = GpuModel::new(&model, emulator()).unwrap();
        assert_eq!(
            gpu.generate(b"Once", 6, Sampling::Temperature(0.8), 5)
                .unwrap(),
            tempered,
            "{attention}"
        );
        assert_eq!(got, want, "{attention}");
    }
}
