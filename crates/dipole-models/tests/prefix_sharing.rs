//! Prefix sharing (`CausalLm::forward_hidden_pairs`): a pair's common prefix run once gives the
//! hidden states, and the gradients, of running both rows whole.

mod common;


use common::fixture;

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use dipole_models::{CausalLm, PrefixPlan, shared_prefixes};


/// Rows `[chosen.., rejected..]` right-padded with 0, and their lengths.
fn paired(pairs: &[(&[u32], &[u32], &[u32])]) -> (Vec<Vec<u32>>, Vec<usize>) {
    let rows: Vec<Vec<u32>> = pairs
        .iter()
        .map(|(prompt, chosen, _)| [*prompt, *chosen].concat())
        .chain(pairs.iter().map(|(prompt, _, rejected)| [*prompt, *rejected].concat()))
        .collect();
    let lens: Vec<usize> = rows.iter().map(Vec::len).collect();
    let t = *lens.iter().max().unwrap();
    (rows.into_iter().map(|mut r| {
        r.resize(t, 0);
        r
    }).collect(), lens)
}

/// Prompts of different lengths, one pair whose completions begin alike (shared past the prompt).
fn uneven() -> (Vec<Vec<u32>>, Vec<usize>) {
    paired(&[
        (&[1, 5, 9, 13], &[20, 21, 22], &[30, 31]),
        (&[1, 7], &[40, 41, 42, 43, 44], &[40, 41, 50]),
        (&[1, 2, 3, 4, 5, 6], &[60], &[61, 62, 63, 64]),
    ])
}

fn both_ways<B: Backend>(model: &mut CausalLm<B>, ids: &[Vec<u32>], lens: &[usize], device: &B::Device) -> (Tensor<B, 3>, Tensor<B, 3>) {
    model.padding_free = false;
    model.prefix_sharing = true;
    let shared = model.forward_hidden_pairs(ids, lens, device);
    model.prefix_sharing = false;
    let whole = model.forward_hidden_pairs(ids, lens, device);
    (shared, whole)
}

#[test]
fn shared_prefixes_stop_one_token_before_either_row_ends() {
    let (ids, lens) = uneven();
    assert_eq!(shared_prefixes(&ids, &lens), vec![4, 4, 6]);
    // identical rows still keep a token of their own
    let (ids, lens) = paired(&[(&[1, 2], &[3, 4], &[3, 4])]);
    assert_eq!(shared_prefixes(&ids, &lens), vec![3]);
}

#[test]
fn the_plan_runs_fewer_positions_or_falls_back() {
    let device = Default::default();
    let (mut model, _) = CausalLm::<Flex>::load(fixture("tiny-llama"), &device).unwrap();
    let (ids, lens) = uneven();
    // 3 * 6 + 6 * 4 = 42 positions instead of 6 * 10
    assert_eq!(model.prefix_plan(&ids, &lens), Some(PrefixPlan { shared: vec![4, 4, 6], prefix_len: 6, suffix_len: 4 }));
    model.prefix_sharing = false;
    assert_eq!(model.prefix_plan(&ids, &lens), None, "switched off");
    model.prefix_sharing = true;
    // a one-token prompt before ten tokens each: 1 + 2 * 10 positions instead of 2 * 11 saves
    // under 5%, not worth a second pass
    let ten: Vec<u32> = (10..20).collect();
    let (ids, lens) = paired(&[(&[1], &ten, &ten.iter().map(|t| t + 10).collect::<Vec<_>>())]);
    assert_eq!(model.prefix_plan(&ids, &lens), None, "too little to gain");
    let (ids, lens) = paired(&[(&[1, 2], &ten, &ten.iter().map(|t| t + 10).collect::<Vec<_>>())]);
    assert!(model.prefix_plan(&ids, &lens).is_some(), "2 + 2 * 10 instead of 2 * 12 saves 8%");
}

#[test]
fn hidden_states_equal_whole_rows_on_every_architecture() {
    let device = Default::default();
    // uneven prompts (a RoPE table per row) and equal ones (one shared table)
    let even = paired(&[(&[1, 5, 9, 13], &[20, 21, 22], &[30, 31]), (&[1, 7, 8, 9], &[40, 41], &[50, 51, 52, 53])]);
    for name in ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-llama3-rope"] {
        let (mut model, _) = CausalLm::<Flex>::load(fixture(name), &device).unwrap();
        for (ids, lens) in [uneven(), even.clone()] {
            model.prefix_sharing = true;
            assert!(model.prefix_plan(&ids, &lens).is_some(), "{name}: sharing applies");
            let (shared, whole) = both_ways(&mut model, &ids, &lens, &device);
            assert_eq!(shared.dims(), whole.dims());
            let diff = common::real_positions_diff(shared, whole, &lens);
            assert!(diff < 1e-5, "{name}: shared-prefix hidden states differ by {diff}");
        }
    }
}

/// Mistral with a window of 3: the masks of both passes count positions from each row's start.
#[test]
fn sliding_windows_count_positions_across_the_split() {
    let dir = common::mistral_with_window(3);
    let device = Default::default();
    let (mut model, _) = CausalLm::<Flex>::load(dir.path(), &device).unwrap();
    assert_eq!(model.layers[0].sliding_window, Some(3));
    let (ids, lens) = uneven();
    let (shared, whole) = both_ways(&mut model, &ids, &lens, &device);
    let diff = common::real_positions_diff(shared, whole, &lens);
    assert!(diff < 1e-5, "windowed hidden states differ by {diff}");
}

/// Both rows' gradients flow back into the one prefix pass: every parameter's gradient equals
/// the whole rows' (a fixed weighting of the real positions' hidden states as the loss).
#[test]
fn gradients_equal_whole_rows() {
    let device = Default::default();
    let (mut model, _) = CausalLm::<common::AD>::load(fixture("tiny-qwen2"), &device).unwrap();
    let (ids, lens) = uneven();
    model.padding_free = false;
    let grads: Vec<[Vec<f32>; 4]> = [true, false]
        .into_iter()
        .map(|sharing| {
            model.prefix_sharing = sharing;
            common::hidden_gradients(&model, model.forward_hidden_pairs(&ids, &lens, &device), &lens)
        })
        .collect();
    common::assert_same_gradients(&grads[0], &grads[1]);
}
