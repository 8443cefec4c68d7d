//! The parts of a DPO step on the benchmark shape (8 sequences x 256 tokens): forward,
//! forward + backward, completion log-probs (windowed logsumexp vs full log-softmax), attention.
//! `cargo bench -p dipole-benches` (add `--features cuda` or `wgpu` for those backends).

use burn::backend::{Autodiff, Flex};
use burn::tensor::activation::log_softmax;
use burn::tensor::module::{attention, attention_fallback};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Distribution, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use dipole_benches::{bench_model, random_ids};
use dipole_loss::{token_logps, token_logps_ops};
use dipole_models::fused::{masked_softmax, masked_softmax_ops};

type B = Flex;
type AD = Autodiff<Flex>;

fn forward(c: &mut Criterion) {
    let device = Default::default();
    let model = bench_model::<B>(&device);
    let ids = random_ids::<B>(8, 256, &device);
    c.bench_function("forward 8x256", |b| {
        b.iter(|| {
            let logits = model.forward(ids.clone(), None);
            let _: f32 = logits.sum().into_scalar();
        })
    });
    let model = bench_model::<AD>(&device);
    let ids = random_ids::<AD>(8, 256, &device);
    c.bench_function("forward+backward 8x256", |b| {
        b.iter(|| {
            let loss = model.forward(ids.clone(), None).mean();
            let _grads = loss.backward();
        })
    });
}

fn logps(c: &mut Criterion) {
    let device = Default::default();
    let logits = Tensor::<AD, 3>::random([8, 192, 8000], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let labels = random_ids::<AD>(8, 192, &device);
    c.bench_function("logps logsumexp (dipole kernel) fwd+bwd", |b| {
        b.iter(|| {
            let lp = token_logps(logits.clone(), labels.clone()).sum();
            let _ = lp.backward();
        })
    });
    c.bench_function("logps logsumexp tensor ops fwd+bwd", |b| {
        b.iter(|| {
            let lp = token_logps_ops(logits.clone(), labels.clone()).sum();
            let _ = lp.backward();
        })
    });
    c.bench_function("logps log_softmax+gather fwd+bwd", |b| {
        b.iter(|| {
            let lp = log_softmax(logits.clone(), 2).gather(2, labels.clone().unsqueeze_dim::<3>(2)).sum();
            let _ = lp.backward();
        })
    });
}

fn attn(c: &mut Criterion) {
    let device = Default::default();
    let q = Tensor::<B, 4>::random([8, 6, 256, 64], Distribution::Normal(0.0, 1.0), &device);
    let options = || AttentionModuleOptions { scale: None, softcap: None, is_causal: true };
    c.bench_function("attention fused (flex)", |b| {
        b.iter(|| {
            let _: f32 = attention(q.clone(), q.clone(), q.clone(), None, None, options()).sum().into_scalar();
        })
    });
    c.bench_function("attention decomposed", |b| {
        b.iter(|| {
            let _: f32 = attention_fallback(q.clone(), q.clone(), q.clone(), None, None, options()).sum().into_scalar();
        })
    });
}

/// The attention softmax of a 4-pair step's rows (causal mask): dipole's fused kernel against the
/// same maths as burn tensor ops, forward and backward.
fn softmax(c: &mut Criterion) {
    let device = Default::default();
    let scores = Tensor::<AD, 4>::random([8, 6, 256, 256], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let causal: Vec<bool> = (0..8 * 6).flat_map(|_| (0..256).flat_map(|i| (0..256).map(move |j| j > i))).collect();
    let mask = Tensor::<AD, 4, burn::tensor::Bool>::from_data(burn::tensor::TensorData::new(causal, [8, 6, 256, 256]), &device);
    c.bench_function("masked softmax (dipole kernel) fwd+bwd", |b| {
        b.iter(|| {
            let _ = (masked_softmax(scores.clone(), mask.clone()) * scores.clone().detach()).sum().backward();
        })
    });
    c.bench_function("masked softmax tensor ops fwd+bwd", |b| {
        b.iter(|| {
            let _ = (masked_softmax_ops(scores.clone(), mask.clone()) * scores.clone().detach()).sum().backward();
        })
    });
}

criterion_group! {
    name = parts;
    config = Criterion::default().sample_size(10);
    targets = forward, logps, attn, softmax
}
criterion_main!(parts);
