//! Padding-free packing (`CausalLm::forward_hidden_packed`, chosen by `forward_hidden_pairs` when it
//! runs the fewest positions): sequences end to end under a block-diagonal mask give the hidden
//! states, and the gradients, of running every row whole.

mod common;

use common::fixture;

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use dipole_models::{CausalLm, PackPlan};

/// Pairs of very uneven lengths, right-padded rows `[chosen.., rejected..]` and their lengths:
/// rows of 14, 4, 3, 4, 3 and 6 tokens pack into 3 rows of 14 (42 positions instead of 84; prefix
/// sharing would run 78).
fn skewed() -> (Vec<Vec<u32>>, Vec<usize>) {
    let pairs: [(&[u32], &[u32], &[u32]); 3] = [(&[1, 5], &[20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31], &[40, 41]), (&[1], &[50, 51, 52], &[60, 61]), (&[1, 7], &[70], &[80, 81, 82, 83])];
    let rows: Vec<Vec<u32>> = pairs.iter().map(|(p, c, _)| [*p, *c].concat()).chain(pairs.iter().map(|(p, _, r)| [*p, *r].concat())).collect();
    let lens: Vec<usize> = rows.iter().map(Vec::len).collect();
    let t = *lens.iter().max().unwrap();
    (rows.into_iter().map(|mut r| {
        r.resize(t, 0);
        r
    }).collect(), lens)
}

/// Packed, then whole rows (packing and prefix sharing off).
fn packed_and_whole<B: Backend>(model: &mut CausalLm<B>, ids: &[Vec<u32>], lens: &[usize], device: &B::Device) -> (Tensor<B, 3>, Tensor<B, 3>) {
    model.padding_free = true;
    assert!(model.pack_plan(lens, ids[0].len()).is_some(), "packing applies");
    let packed = model.forward_hidden_pairs(ids, lens, device);
    model.padding_free = false;
    model.prefix_sharing = false;
    let whole = model.forward_hidden_pairs(ids, lens, device);
    model.prefix_sharing = true;
    (packed, whole)
}

#[test]
fn packing_is_chosen_only_where_it_runs_the_fewest_positions() {
    let device = Default::default();
    let (mut model, _) = CausalLm::<Flex>::load(fixture("tiny-llama"), &device).unwrap();
    let (ids, lens) = skewed();
    let plan = model.pack_plan(&lens, 14).unwrap();
    assert_eq!(plan, PackPlan { rows: vec![vec![0], vec![5, 1, 3], vec![2, 4]], len: 14 });
    assert_eq!(model.prefix_plan(&ids, &lens).unwrap().positions(6), 78, "prefix sharing runs more");
    model.padding_free = false;
    assert_eq!(model.pack_plan(&lens, 14), None, "switched off");
    model.padding_free = true;
    // equal lengths leave nothing to pack
    assert_eq!(model.pack_plan(&[5, 5, 5, 5], 5), None);
    // rows padded beyond their longest sequence pack into fewer, shorter rows
    assert_eq!(model.pack_plan(&[5, 5], 8).map(|p| p.positions()), Some(10));
}

#[test]
fn packed_hidden_states_equal_whole_rows_on_every_architecture() {
    let device = Default::default();
    for name in ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-llama3-rope"] {
        let (mut model, _) = CausalLm::<Flex>::load(fixture(name), &device).unwrap();
        let (ids, lens) = skewed();
        let (packed, whole) = packed_and_whole(&mut model, &ids, &lens, &device);
        assert_eq!(packed.dims(), whole.dims());
        let diff = common::real_positions_diff(packed, whole, &lens);
        assert!(diff < 1e-5, "{name}: packed hidden states differ by {diff}");
    }
}

/// Mistral with a window of 3: positions, and so windows, restart with every packed sequence.
#[test]
fn sliding_windows_restart_with_every_packed_sequence() {
    let dir = common::mistral_with_window(3);
    let device = Default::default();
    let (mut model, _) = CausalLm::<Flex>::load(dir.path(), &device).unwrap();
    let (ids, lens) = skewed();
    let (packed, whole) = packed_and_whole(&mut model, &ids, &lens, &device);
    let diff = common::real_positions_diff(packed, whole, &lens);
    assert!(diff < 1e-5, "windowed packed hidden states differ by {diff}");
}

/// Every parameter's gradient through the packed rows equals the whole rows' (a fixed weighting of
/// the real positions' hidden states as the loss).
#[test]
fn packed_gradients_equal_whole_rows() {
    let device = Default::default();
    let (mut model, _) = CausalLm::<common::AD>::load(fixture("tiny-qwen2"), &device).unwrap();
    let (ids, lens) = skewed();
    let (packed, whole) = packed_and_whole(&mut model, &ids, &lens, &device);
    common::assert_same_gradients(&common::hidden_gradients(&model, packed, &lens), &common::hidden_gradients(&model, whole, &lens));
}
