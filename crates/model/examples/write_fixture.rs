//! Writes the old-format checkpoints and their logits (one-off, see the fixture README).
use linattn_model::{AttentionKind, Config, CpuAttention, FeatureMap, Model};
use safetensors::{tensor::TensorView, Dtype};

fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let prompt = b"Linear attention!";
    for kind in [AttentionKind::Linear, AttentionKind::Softmax] {
        let config = Config {
            d_model: 8,
            heads: 2,
            layers: 2,
            mlp: 16,
            attention: kind,
            feature_map: FeatureMap::EluPlusOne,
        };
        let model = Model::random(config, 2024).unwrap();
        model.save(dir.join(format!("v0-{kind}.safetensors"))).unwrap();
        let logits = model.forward(&CpuAttention, prompt).unwrap();
        let bytes: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
        let tokens: Vec<u8> = prompt.to_vec();
        let views = vec![
            ("logits", TensorView::new(Dtype::F32, vec![prompt.len(), 256], &bytes).unwrap()),
            ("tokens", TensorView::new(Dtype::U8, vec![prompt.len()], &tokens).unwrap()),
        ];
        let out = safetensors::serialize(views, None).unwrap();
        std::fs::write(dir.join(format!("v0-{kind}-logits.safetensors")), out).unwrap();
    }
}
