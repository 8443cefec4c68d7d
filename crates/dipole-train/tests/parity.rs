//! Parity with TRL 1.16 / transformers 5.24 goldens (`fixtures/goldens`): token ids, dropped records
//! and per-sequence / per-token log-probs for every tiny checkpoint, base and perturbed, with the
//! fused CPU kernels (`tensor_ops.rs` runs the same checks on the tensor-op forms GPUs run).

mod common;

use burn::backend::Flex;
use common::{check_logps, check_parity, fixtures, golden_of};
use dipole_data::{LengthOptions, Tokenizer, TruncationMode, load_pairs};
use dipole_models::CausalLm;
use dipole_train::pair_logps;

common::per_fixture!(|model, format| check_parity(model, format, 4));

/// The layout transformers 5 saves: the chat template in `chat_template.jinja` (none in
/// `tokenizer_config.json`), `pad_token` equal to `eos_token` (and `pad_token_id` in config.json),
/// a `dtype` key and no `torch_dtype`. Same weights as tiny-llama, so TRL's goldens for it hold:
/// padding with the EOS id must not mask the completions' own EOS tokens.
#[test]
fn a_transformers_5_checkpoint_layout_scores_as_trl_does() {
    let dir = common::fixtures().join("tiny-llama-hf5");
    assert!(dir.join("chat_template.jinja").is_file());
    let tokenizer = dipole_data::Tokenizer::from_dir(&dir).unwrap();
    assert!(tokenizer.chat_template.is_some(), "the template is read from chat_template.jinja");
    assert_eq!(Some(tokenizer.pad_id()), tokenizer.eos.as_ref().map(|t| t.id), "pad is eos");
    for format in ["standard", "conversational"] {
        common::check_parity_of("tiny-llama", &[("tiny-llama-hf5", "ref")], format, 4);
    }
}

/// Another machine sums in another order: other batch sizes (other padding and prompt sharing),
/// other thread counts (other splits of every reduction). Each must stay within the same
/// tolerances, so an order-dependent rounding shows up here rather than on the next CI machine.
#[test]
fn other_summation_orders_stay_within_every_tolerance() {
    let (model_name, format) = ("tiny-qwen2", "conversational");
    let root = fixtures();
    let golden = golden_of(model_name, format, "examples.json");
    let examples = golden["examples"].as_array().unwrap();
    let dir = root.join(format!("{model_name}-perturbed"));
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    let lengths = LengthOptions { max_length: Some(128), truncation: TruncationMode::KeepStart, ..Default::default() };
    let prepared = load_pairs(&root.join(format!("data/prefs_{format}.jsonl")), &tokenizer, lengths).unwrap();
    let device = Default::default();
    let (model, _) = CausalLm::<Flex>::load(&dir, &device).unwrap();
    for (threads, batch_size) in [(1, 1), (2, 3), (3, 8), (4, 64)] {
        let pool = rayon_core::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let logps = pool.install(|| pair_logps(&model, &prepared.pairs, batch_size, tokenizer.pad_id(), &device));
        let worst = check_logps(&format!("{model_name}-perturbed ({threads} threads, batches of {batch_size})"), format, "policy", &logps, examples);
        eprintln!("{threads} threads, batches of {batch_size}: worst summed log-prob difference {worst:.2e}");
    }
}
