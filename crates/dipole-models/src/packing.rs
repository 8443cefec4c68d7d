//! Padding-free packing: the sequences of a batch laid end to end in as few rows as hold them, each
//! attending only to itself (a block-diagonal causal mask) with positions restarting at 0, so a
//! batch of uneven lengths runs its real tokens instead of every row padded to the longest.

use burn::tensor::{Bool, Int, Tensor, TensorData, backend::Backend};

use crate::checkpointing::{LayerTape, Pass, Rows};
use crate::llama::{CausalLm, ids_tensor, mask_heads};
use crate::rope;

/// Where each sequence goes: rows of `len` positions, each holding whole sequences in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackPlan {
    /// The sequences (indices into the batch's rows) each packed row holds, in order.
    pub rows: Vec<Vec<usize>>,
    /// Positions per packed row: the longest sequence.
    pub len: usize,
}

impl PackPlan {
    /// First-fit decreasing: sequences longest first, each into the first row with room, rows
    /// `max(lens)` long. `None` for an empty batch.
    pub fn new(lens: &[usize]) -> Option<PackPlan> {
        let len = lens.iter().copied().max().filter(|&l| l > 0)?;
        let mut order: Vec<usize> = (0..lens.len()).collect();
        order.sort_by_key(|&r| std::cmp::Reverse(lens[r]));
        let mut rows: Vec<(usize, Vec<usize>)> = Vec::new();
        for r in order {
            match rows.iter_mut().find(|(used, _)| used + lens[r] <= len) {
                Some((used, members)) => {
                    *used += lens[r];
                    members.push(r);
                }
                None => rows.push((lens[r], vec![r])),
            }
        }
        Some(PackPlan { rows: rows.into_iter().map(|(_, members)| members).collect(), len })
    }

    /// Positions the packed rows run.
    pub fn positions(&self) -> usize {
        self.rows.len() * self.len
    }
}

/// One packed row's layout: the token at each position, its position within its own sequence
/// (what RoPE sees) and which of the row's sequences it belongs to (trailing padding continues the
/// last one, so no query is left without keys; nothing real comes after it to see it).
struct PackedRow {
    ids: Vec<u32>,
    positions: Vec<usize>,
    segments: Vec<usize>,
}

impl<B: Backend> CausalLm<B> {
    /// [`forward_hidden`](Self::forward_hidden) of right-padded rows `input_ids` (`lens[r]` real
    /// tokens each) run packed as `plan` says, returned in the rows' own `[rows, T, hidden]` layout
    /// (padding positions repeat the row's last token; their outputs are never read). Equal to
    /// whole rows up to float rounding, gradients included.
    pub fn forward_hidden_packed(&self, input_ids: &[Vec<u32>], lens: &[usize], plan: &PackPlan, device: &B::Device) -> Tensor<B, 3> {
        self.packed_hidden(input_ids, lens, plan, device, false).0
    }

    /// [`forward_hidden_packed`](Self::forward_hidden_packed), recorded on a tape when `checkpoint`.
    pub(crate) fn packed_hidden(&self, input_ids: &[Vec<u32>], lens: &[usize], plan: &PackPlan, device: &B::Device, checkpoint: bool) -> (Tensor<B, 3>, Option<LayerTape<B>>) {
        let (rows, t) = (input_ids.len(), input_ids.first().map_or(0, Vec::len));
        let cfg = &self.config;
        let mut placed = vec![(0, 0); rows];
        let packed: Vec<PackedRow> = plan
            .rows
            .iter()
            .enumerate()
            .map(|(p, members)| {
                let mut row = PackedRow { ids: Vec::with_capacity(plan.len), positions: Vec::with_capacity(plan.len), segments: Vec::with_capacity(plan.len) };
                for (s, &r) in members.iter().enumerate() {
                    placed[r] = (p, row.ids.len());
                    row.ids.extend_from_slice(&input_ids[r][..lens[r]]);
                    row.positions.extend(0..lens[r]);
                    row.segments.extend(std::iter::repeat_n(s, lens[r]));
                }
                let (last, next) = (members.len() - 1, row.positions.last().map_or(0, |&q| q + 1));
                let pad = plan.len - row.ids.len();
                row.ids.extend(std::iter::repeat_n(0, pad));
                row.positions.extend(next..next + pad);
                row.segments.extend(std::iter::repeat_n(last, pad));
                row
            })
            .collect();
        let n = packed.len();
        let ids: Vec<Vec<u32>> = packed.iter().map(|r| r.ids.clone()).collect();
        let positions: Vec<usize> = packed.iter().flat_map(|r| r.positions.iter().copied()).collect();
        let (cos, sin) = rope::tables_at::<B>(&cfg.rope, cfg.head_dim, &positions, plan.len, device);
        let rotary = self.rotary(cos, sin, n);
        let heads = mask_heads::<B>(cfg.num_attention_heads, device);
        let masks = self.layer_masks_with(plan.len, |window| segment_mask(&packed, window, heads, device));
        let (mut hidden, tape) = self.run_pass(Pass::whole(Rows { ids: ids_tensor(&ids, device), rotary, masks }), checkpoint);
        let hidden = hidden.remove(0);

        let h = cfg.hidden_size;
        let index: Vec<i64> = (0..rows)
            .flat_map(|r| {
                let ((p, offset), last) = (placed[r], lens[r].max(1) - 1);
                (0..t).map(move |i| (p * plan.len + offset + i.min(last)) as i64)
            })
            .collect();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [rows * t]), device);
        (hidden.reshape([n * plan.len, h]).select(0, index).reshape([rows, t, h]), tape)
    }
}

/// `[rows, heads, len, len]`, true where a query may not see a key: another sequence's, a later
/// one, or one `window` or more positions back.
fn segment_mask<B: Backend>(rows: &[PackedRow], window: Option<usize>, heads: usize, device: &B::Device) -> Tensor<B, 4, Bool> {
    let len = rows.first().map_or(0, |r| r.ids.len());
    let mut hidden = Vec::with_capacity(rows.len() * heads * len * len);
    for row in rows {
        let start = hidden.len();
        for q in 0..len {
            hidden.extend((0..len).map(|k| {
                let (qp, kp) = (row.positions[q], row.positions[k]);
                row.segments[k] != row.segments[q] || k > q || window.is_some_and(|w| qp - kp >= w)
            }));
        }
        for _ in 1..heads {
            hidden.extend_from_within(start..start + len * len);
        }
    }
    Tensor::from_data(TensorData::new(hidden, [rows.len(), heads, len, len]), device)
}

#[cfg(test)]
mod tests {
    use super::PackPlan;

    #[test]
    fn first_fit_decreasing_fills_rows_of_the_longest_length() {
        let plan = PackPlan::new(&[10, 3, 7, 2, 5, 5]).unwrap();
        assert_eq!(plan.len, 10);
        assert_eq!(plan.rows, vec![vec![0], vec![2, 1], vec![4, 5], vec![3]]);
        assert_eq!(plan.positions(), 40);
        assert_eq!(PackPlan::new(&[]), None);
        assert_eq!(PackPlan::new(&[0, 0]), None);
    }
}
