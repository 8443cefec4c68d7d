//! Precision on a deep model: completion log-probs of `tiny-deep-llama` (24 layers, a 32,000-token
//! vocabulary, weights scaled like a trained model's) against a float64 evaluation of the same
//! model, held to the error of transformers in float32 on the same 16 sequences (both in
//! `fixtures/goldens/deep/logps.json`, made by `fixtures/tools/make_deep_fixture.py`): the largest
//! error of a sequence's summed log-probs, and the RMS error of the per-token log-probs.
//!
//! Three evaluations of each sequence, each with the fused kernels on and off (the tensor-op forms,
//! the graph GPU backends run):
//! * the fused LM head (`CausalLm::head_logps`, what training and the reference pass run),
//! * whole logits then `dipole_kernels::logps` (the path without the fused head),
//! * whole f32 logits with the log-softmax and the sum in f64 on the host: the trunk's error alone.
//!
//! Sums of log-probs are f32 sums of f32 log-probs, as dipole-loss takes them.
//!
//! One test function: it switches the fused kernels off for its second half (a process-wide
//! setting), which no other test in this binary may see.

mod common;

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use dipole_models::{CausalLm, ids_tensor};
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    /// transformers f32: the largest error of a sequence's summed log-probs.
    f32_max_error: f64,
    /// transformers f32: the RMS error of per-token log-probs over every sequence's completion.
    f32_token_rms_error: f64,
    sequences: Vec<Sequence>,
}

#[derive(Deserialize)]
struct Sequence {
    input_ids: Vec<u32>,
    prompt_len: usize,
    f64_logps: f64,
    f32_error: f64,
    f64_token_logps: Vec<f64>,
}

fn golden() -> Golden {
    let path = common::fixture("goldens/deep/logps.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One way of computing every sequence's completion log-probs: per token, and their sums.
#[derive(Default)]
struct Evaluation {
    tokens: Vec<Vec<f64>>,
    sums: Vec<f64>,
}

impl Evaluation {
    fn push_f32(&mut self, per_token: Tensor<Flex, 1>) {
        self.sums.push(per_token.clone().sum().into_scalar() as f64);
        self.tokens.push(per_token.into_data().to_vec::<f32>().unwrap().into_iter().map(f64::from).collect());
    }

    /// Each sequence's error of the summed log-probs.
    fn sum_errors(&self, golden: &Golden) -> Vec<f64> {
        self.sums.iter().zip(&golden.sequences).map(|(v, s)| v - s.f64_logps).collect()
    }

    fn max_error(&self, golden: &Golden) -> f64 {
        self.sum_errors(golden).into_iter().fold(0.0, |a, e| a.max(e.abs()))
    }

    fn token_rms_error(&self, golden: &Golden) -> f64 {
        let (mut squares, mut n) = (0.0, 0usize);
        for (tokens, s) in self.tokens.iter().zip(&golden.sequences) {
            assert_eq!(tokens.len(), s.f64_token_logps.len());
            squares += tokens.iter().zip(&s.f64_token_logps).map(|(a, b)| (a - b).powi(2)).sum::<f64>();
            n += tokens.len();
        }
        (squares / n as f64).sqrt()
    }
}

struct Measured {
    fused_head: Evaluation,
    whole_logits: Evaluation,
    /// f32 logits, log-softmax and sums in f64.
    trunk: Evaluation,
}

fn measure(model: &CausalLm<Flex>, golden: &Golden) -> Measured {
    let device = Default::default();
    let seqs = &golden.sequences;
    let t = seqs.iter().map(|s| s.input_ids.len()).max().unwrap();
    // one right-padded batch, as training runs it
    let rows: Vec<Vec<u32>> = seqs
        .iter()
        .map(|s| {
            let mut ids = s.input_ids.clone();
            ids.resize(t, 0);
            ids
        })
        .collect();
    let mask: Vec<i64> = seqs.iter().flat_map(|s| (0..t).map(move |i| (i < s.input_ids.len()) as i64)).collect();
    let mask = Tensor::<Flex, 2, Int>::from_data(TensorData::new(mask, [seqs.len(), t]), &device);
    let hidden = model.forward_hidden(ids_tensor::<Flex>(&rows, &device), Some(mask), None);
    let h = model.config.hidden_size;
    let mut m = Measured { fused_head: Evaluation::default(), whole_logits: Evaluation::default(), trunk: Evaluation::default() };
    for (r, s) in seqs.iter().enumerate() {
        // predictions prompt_len - 1 .. len - 1 score tokens prompt_len .. len
        let (start, end) = (s.prompt_len - 1, s.input_ids.len() - 1);
        let n = end - start;
        let rows_hidden = hidden.clone().slice([r..r + 1, start..end, 0..h]);
        let labels: Vec<i64> = s.input_ids[start + 1..=end].iter().map(|&t| t as i64).collect();
        let labels_t = |shape: [usize; 2]| Tensor::<Flex, 2, Int>::from_data(TensorData::new(labels.clone(), shape), &device);

        let head = model.head_logps(rows_hidden.clone().reshape([n, h]), labels_t([1, n]).reshape([n])).expect("a fused head: tied, no adapter");
        m.fused_head.push_f32(head.logps);

        let logits = model.logits(rows_hidden);
        let per_token = match dipole_kernels::logps::try_token_logps(logits.clone(), labels_t([1, n]), false) {
            Ok((logps, _)) => logps,
            Err((logits, labels)) => token_logps_ops(logits, labels),
        };
        m.whole_logits.push_f32(per_token.reshape([n]));

        let x: Vec<f32> = logits.into_data().to_vec().unwrap();
        let vocab = x.len() / n;
        let tokens: Vec<f64> = (0..n)
            .map(|p| {
                let row = &x[p * vocab..(p + 1) * vocab];
                let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
                let lse = row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
                row[labels[p] as usize] as f64 - lse
            })
            .collect();
        m.trunk.sums.push(tokens.iter().sum());
        m.trunk.tokens.push(tokens);
    }
    m
}

/// `logit[label] - logsumexp(logits)` as burn tensor ops: dipole-loss's `token_logps_ops`, the
/// form that runs where the fused kernels do not.
fn token_logps_ops(logits: Tensor<Flex, 3>, labels: Tensor<Flex, 2, Int>) -> Tensor<Flex, 2> {
    let max = logits.clone().detach().max_dim(2);
    let lse = (logits.clone() - max.clone()).exp().sum_dim(2).log() + max;
    (logits.gather(2, labels.unsqueeze_dim::<3>(2)) - lse).squeeze_dim::<2>(2)
}

fn errors(values: &[f64]) -> String {
    let v: Vec<String> = values.iter().map(|e| format!("{e:+.1e}")).collect();
    v.join(" ")
}

#[test]
fn deep_model_log_probs_are_as_exact_as_transformers_in_f32() {
    let golden = golden();
    let (model, _) = CausalLm::<Flex>::load(common::fixture("tiny-deep-llama"), &Default::default()).unwrap();
    assert_eq!(model.layers.len(), 24);
    let (max_reference, rms_reference) = (golden.f32_max_error, golden.f32_token_rms_error);
    let reference: Vec<String> = golden.sequences.iter().map(|s| format!("{:.1e}", s.f32_error)).collect();
    eprintln!("transformers f32: summed max error {max_reference:.3e}, per-token rms {rms_reference:.3e}; |error| per sequence {}", reference.join(" "));

    let mut failures = Vec::new();
    for fused in [true, false] {
        dipole_kernels::set_fused(fused);
        let m = measure(&model, &golden);
        for (what, eval) in [("fused head", &m.fused_head), ("whole logits", &m.whole_logits), ("trunk (f64 log-softmax)", &m.trunk)] {
            let (max, rms) = (eval.max_error(&golden), eval.token_rms_error(&golden));
            eprintln!("dipole, fused kernels {fused}, {what}: summed max error {max:.3e}, per-token rms {rms:.3e}; per sequence {}", errors(&eval.sum_errors(&golden)));
            if max > max_reference {
                failures.push(format!("fused kernels {fused}, {what}: summed log-probs {max:.3e} from float64, transformers f32 {max_reference:.3e}"));
            }
            if rms > rms_reference {
                failures.push(format!("fused kernels {fused}, {what}: per-token log-probs rms {rms:.3e} from float64, transformers f32 {rms_reference:.3e}"));
            }
        }
    }
    dipole_kernels::set_fused(true);
    assert!(failures.is_empty(), "less exact than transformers in f32:\n{}", failures.join("\n"));
}
