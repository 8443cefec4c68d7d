//! Each kernel against its formula written out in f64 on the host, forward and backward (the
//! gradient of `sum(out * w)` for fixed weights `w`), on `Flex` and `Autodiff<Flex>`.
//!
//! Tolerance: the kernels compute in f32 with an `exp` within 2 ulp, summing rows of at most 64
//! values, so each result is within about 64 · 2^-24 ≈ 4e-6 of the exact value relative to the
//! magnitudes summed; 2e-5 · max(1, |exact|) leaves a factor 5 for the few operations around the sums.

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Bool, Int, Tensor, TensorData};
use dipole_kernels::{attention, logps, swiglu};

type AD = Autodiff<Flex>;

/// Deterministic, irregular values in about [-scale, scale].
fn values(n: usize, seed: f64, scale: f64) -> Vec<f64> {
    (0..n).map(|i| ((i as f64 + 1.0) * 0.754_877 + seed).sin() * scale * ((i as f64 * 0.31 + seed).cos() + 1.5) / 2.5).collect()
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn host<const D: usize>(t: Tensor<impl burn::tensor::backend::Backend, D>) -> Vec<f64> {
    t.into_data().to_vec::<f32>().unwrap().into_iter().map(f64::from).collect()
}

fn assert_close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 2e-5 * w.abs().max(1.0), "{what}[{i}]: {g} vs exact {w}");
    }
}

fn tensor<B: burn::tensor::backend::Backend, const D: usize>(v: &[f64], shape: [usize; D]) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(f32s(v), shape), &Default::default())
}

#[test]
fn masked_softmax_matches_its_formula_and_zeroes_fully_hidden_rows() {
    let [b, h, q, k] = [2, 3, 4, 7];
    let scores = values(b * h * q * k, 0.3, 6.0);
    // causal, with row 0 of batch 1 hidden entirely
    let hidden: Vec<bool> = (0..b * q * k).map(|i| (i % k) > (i / k) % q || (i / (q * k) == 1 && (i / k) % q == 0)).collect();
    let w = values(b * h * q * k, 1.7, 1.0);
    let (mut want, mut want_grad) = (vec![0.0; scores.len()], vec![0.0; scores.len()]);
    for row in 0..b * h * q {
        let (batch, qi) = (row / (h * q), row % q);
        let keep = |j: usize| !hidden[(batch * q + qi) * k + j];
        let s = &scores[row * k..(row + 1) * k];
        let max = (0..k).filter(|&j| keep(j)).map(|j| s[j]).fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = (0..k).filter(|&j| keep(j)).map(|j| (s[j] - max).exp()).sum();
        for j in (0..k).filter(|&j| keep(j)) {
            want[row * k + j] = (s[j] - max).exp() / total;
        }
        let y = &want[row * k..(row + 1) * k];
        let yw: f64 = (0..k).map(|j| y[j] * w[row * k + j]).sum();
        for j in 0..k {
            want_grad[row * k + j] = y[j] * (w[row * k + j] - yw);
        }
    }
    let mask = |device: &_| Tensor::<Flex, 4, Bool>::from_data(TensorData::new(hidden.clone(), [b, 1, q, k]), device);
    let got = attention::try_masked_softmax(tensor::<Flex, 4>(&scores, [b, h, q, k]), mask(&Default::default())).unwrap();
    assert_close("softmax", &host(got), &want);
    assert!(want[(h * q) * k..(h * q + 1) * k].iter().all(|&y| y == 0.0), "the hidden row is zeros");

    let x = tensor::<AD, 4>(&scores, [b, h, q, k]).require_grad();
    let mask = Tensor::<AD, 4, Bool>::from_data(TensorData::new(hidden.clone(), [b, 1, q, k]), &Default::default());
    let y = attention::try_masked_softmax(x.clone(), mask).unwrap();
    assert_close("softmax (autodiff)", &host(y.clone()), &want);
    let grads = (y * tensor::<AD, 4>(&w, [b, h, q, k])).sum().backward();
    assert_close("softmax gradient", &host(x.grad(&grads).unwrap()), &want_grad);
}

#[test]
fn split_heads_rotates_and_merge_heads_undoes_the_layout() {
    let [b, len, heads, d] = [2, 5, 3, 8];
    let x = values(b * len * heads * d, 0.9, 2.0);
    let cos = values(len * d, 2.1, 1.0);
    let sin = values(len * d, 3.3, 1.0);
    let w = values(b * heads * len * d, 4.4, 1.0);
    let at_x = |bi: usize, t: usize, hi: usize, j: usize| ((bi * len + t) * heads + hi) * d + j;
    let at_out = |bi: usize, hi: usize, t: usize, j: usize| ((bi * heads + hi) * len + t) * d + j;
    let half = |j: usize| (j + d / 2) % d;
    let (mut want, mut want_grad) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    for (bi, hi, t, j) in (0..b).flat_map(|bi| (0..heads).flat_map(move |hi| (0..len).flat_map(move |t| (0..d).map(move |j| (bi, hi, t, j))))) {
        want[at_out(bi, hi, t, j)] = x[at_x(bi, t, hi, j)] * cos[t * d + j] + x[at_x(bi, t, hi, half(j))] * sin[t * d + j];
        // x[.., j] feeds out[j] through cos[j] and out[half(j)] through sin[half(j)]
        want_grad[at_x(bi, t, hi, j)] = w[at_out(bi, hi, t, j)] * cos[t * d + j] + w[at_out(bi, hi, t, half(j))] * sin[t * d + half(j)];
    }
    let tables = |c: &[f64], s: &[f64]| Some((tensor::<Flex, 2>(c, [1, len * d]), tensor::<Flex, 2>(s, [1, len * d])));
    let got = attention::try_split_heads(tensor::<Flex, 3>(&x, [b, len, heads * d]), heads, tables(&cos, &sin)).unwrap();
    assert_close("split + rope", &host(got), &want);

    let input = tensor::<AD, 3>(&x, [b, len, heads * d]).require_grad();
    let ad_tables = Some((tensor::<AD, 2>(&cos, [1, len * d]), tensor::<AD, 2>(&sin, [1, len * d])));
    let y = attention::try_split_heads(input.clone(), heads, ad_tables).unwrap();
    let grads = (y * tensor::<AD, 4>(&w, [b, heads, len, d])).sum().backward();
    assert_close("split + rope gradient", &host(input.grad(&grads).unwrap()), &want_grad);

    // without tables the split is a pure layout change, which merge inverts exactly
    let split = attention::try_split_heads(tensor::<Flex, 3>(&x, [b, len, heads * d]), heads, None).unwrap();
    let merged = attention::try_merge_heads(split).unwrap();
    assert_eq!(host(merged), f32s(&x).into_iter().map(f64::from).collect::<Vec<_>>());
    let heads_in = tensor::<AD, 4>(&w, [b, heads, len, d]).require_grad();
    let rows = attention::try_merge_heads(heads_in.clone()).unwrap();
    let grads = (rows * tensor::<AD, 3>(&x, [b, len, heads * d])).sum().backward();
    let want_merge_grad: Vec<f64> = (0..w.len())
        .map(|i| {
            let (bi, hi, t, j) = (i / (heads * len * d), i / (len * d) % heads, i / d % len, i % d);
            f64::from(x[at_x(bi, t, hi, j)] as f32)
        })
        .collect();
    assert_close("merge gradient", &host(heads_in.grad(&grads).unwrap()), &want_merge_grad);
}

#[test]
fn silu_mul_matches_its_formula() {
    let n = 3 * 37;
    let (gate, up, w) = (values(n, 0.2, 8.0), values(n, 1.1, 3.0), values(n, 2.5, 1.0));
    let sigmoid = |g: f64| 1.0 / (1.0 + (-g).exp());
    let want: Vec<f64> = (0..n).map(|i| gate[i] * sigmoid(gate[i]) * up[i]).collect();
    let want_gate: Vec<f64> = (0..n).map(|i| w[i] * up[i] * sigmoid(gate[i]) * (1.0 + gate[i] * (1.0 - sigmoid(gate[i])))).collect();
    let want_up: Vec<f64> = (0..n).map(|i| w[i] * gate[i] * sigmoid(gate[i])).collect();
    let got = swiglu::try_silu_mul(tensor::<Flex, 2>(&gate, [3, 37]), tensor::<Flex, 2>(&up, [3, 37])).unwrap();
    assert_close("silu * up", &host(got), &want);

    let (g, u) = (tensor::<AD, 2>(&gate, [3, 37]).require_grad(), tensor::<AD, 2>(&up, [3, 37]).require_grad());
    let y = swiglu::try_silu_mul(g.clone(), u.clone()).unwrap();
    let grads = (y * tensor::<AD, 2>(&w, [3, 37])).sum().backward();
    assert_close("gate gradient", &host(g.grad(&grads).unwrap()), &want_gate);
    assert_close("up gradient", &host(u.grad(&grads).unwrap()), &want_up);
}

#[test]
fn token_logps_and_entropy_match_log_softmax() {
    let [rows, len, vocab] = [2, 3, 50];
    let logits = values(rows * len * vocab, 0.7, 10.0);
    let labels: Vec<i64> = (0..rows * len).map(|i| ((i * 17 + 3) % vocab) as i64).collect();
    let w = values(rows * len, 5.5, 1.0);
    let (mut want, mut want_entropy, mut want_grad) = (Vec::new(), Vec::new(), vec![0.0; logits.len()]);
    for p in 0..rows * len {
        let row = &logits[p * vocab..(p + 1) * vocab];
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|&z| (z - max).exp()).sum::<f64>().ln();
        want.push(row[labels[p] as usize] - lse);
        want_entropy.push(lse - row.iter().map(|&z| (z - lse).exp() * z).sum::<f64>());
        for (j, &z) in row.iter().enumerate() {
            let onehot = if j == labels[p] as usize { 1.0 } else { 0.0 };
            want_grad[p * vocab + j] = w[p] * (onehot - (z - lse).exp());
        }
    }
    let ids = |device: &_| Tensor::<Flex, 2, Int>::from_data(TensorData::new(labels.clone(), [rows, len]), device);
    let (lp, entropy) = logps::try_token_logps(tensor::<Flex, 3>(&logits, [rows, len, vocab]), ids(&Default::default()), true).unwrap();
    assert_close("log-probs", &host(lp), &want);
    assert_close("entropy", &host(entropy.expect("asked for")), &want_entropy);

    let x = tensor::<AD, 3>(&logits, [rows, len, vocab]).require_grad();
    let ids = Tensor::<AD, 2, Int>::from_data(TensorData::new(labels.clone(), [rows, len]), &Default::default());
    let (lp, entropy) = logps::try_token_logps(x.clone(), ids, false).unwrap();
    assert!(entropy.is_none(), "not asked for");
    let grads = (lp * tensor::<AD, 2>(&w, [rows, len])).sum().backward();
    assert_close("log-prob gradient", &host(x.grad(&grads).unwrap()), &want_grad);
}

/// The fused head against the whole `[positions, vocab]` logits in f64: log-probs, entropy, mean
/// logit, `log Σ p²`, argmax, and the gradients of `Σ w · logp` for the hidden states and the weight.
/// Tiles of 3 positions × 50 tokens over 7 positions × 203 tokens hit uneven last blocks and chunks.
/// Its sums run over at most 203 terms, so the tolerance's 2e-5 still covers them (203 · 2^-24 ≈ 1.2e-5).
#[test]
fn fused_head_matches_the_whole_logits_and_their_gradients() {
    use dipole_kernels::head::{HeadOptions, head_logps};
    let [n, h, vocab] = [7, 16, 203];
    let (hidden, weight) = (values(n * h, 0.3, 2.0), values(h * vocab, 1.9, 1.0));
    let labels: Vec<i64> = (0..n).map(|i| ((i * 61 + 5) % vocab) as i64).collect();
    let w = values(n, 4.2, 1.0);
    let (hidden, weight): (Vec<f64>, Vec<f64>) = (hidden.iter().map(|&x| x as f32 as f64).collect(), weight.iter().map(|&x| x as f32 as f64).collect());
    let mut want = [vec![], vec![], vec![], vec![]];
    let mut want_argmax = vec![];
    let (mut d_hidden, mut d_weight) = (vec![0.0; n * h], vec![0.0; h * vocab]);
    for p in 0..n {
        let logits: Vec<f64> = (0..vocab).map(|v| (0..h).map(|k| hidden[p * h + k] * weight[k * vocab + v]).sum()).collect();
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + logits.iter().map(|&z| (z - max).exp()).sum::<f64>().ln();
        let prob = |z: f64| (z - lse).exp();
        want[0].push(logits[labels[p] as usize] - lse);
        want[1].push(-logits.iter().map(|&z| prob(z) * (z - lse)).sum::<f64>());
        want[2].push(logits.iter().sum::<f64>() / vocab as f64);
        want[3].push(logits.iter().map(|&z| prob(z) * prob(z)).sum::<f64>().ln());
        want_argmax.push(logits.iter().position(|&z| z == max).unwrap() as i64);
        for (v, &z) in logits.iter().enumerate() {
            let d = w[p] * (if v == labels[p] as usize { 1.0 } else { 0.0 } - prob(z));
            for k in 0..h {
                d_hidden[p * h + k] += d * weight[k * vocab + v];
                d_weight[k * vocab + v] += d * hidden[p * h + k];
            }
        }
    }
    let options = HeadOptions { tile_elements: 150, vocab_chunk: 50, ..HeadOptions::default() };
    let ids = || Tensor::<AD, 1, Int>::from_data(TensorData::new(labels.clone(), [n]), &Default::default());
    let (x, wt) = (tensor::<AD, 2>(&hidden, [n, h]).require_grad(), tensor::<AD, 2>(&weight, [h, vocab]).require_grad());
    let out = head_logps(x.clone(), wt.clone(), ids(), options);
    for (name, got, want) in [("log-probs", out.logps.clone(), &want[0]), ("entropy", out.entropy, &want[1]), ("mean logit", out.logit_mean, &want[2]), ("log sum of squares", out.log_sum_sq, &want[3])] {
        assert_close(name, &host(got), want);
    }
    assert_eq!(out.argmax.into_data().convert::<i64>().to_vec::<i64>().unwrap(), want_argmax, "argmax");
    let grads = (out.logps * tensor::<AD, 1>(&w, [n])).sum().backward();
    assert_close("hidden gradient", &host(x.grad(&grads).unwrap()), &d_hidden);
    assert_close("weight gradient", &host(wt.grad(&grads).unwrap()), &d_weight);

    // a frozen weight gets no gradient, the hidden states the same one
    let (x, wt) = (tensor::<AD, 2>(&hidden, [n, h]).require_grad(), tensor::<AD, 2>(&weight, [h, vocab]));
    let grads = (head_logps(x.clone(), wt.clone(), ids(), options).logps * tensor::<AD, 1>(&w, [n])).sum().backward();
    assert_close("hidden gradient, frozen weight", &host(x.grad(&grads).unwrap()), &d_hidden);
    assert!(wt.grad(&grads).is_none(), "a frozen weight has no gradient");

    // without autodiff, one tile or many, the same values
    for options in [options, HeadOptions::default()] {
        let ids = Tensor::<Flex, 1, Int>::from_data(TensorData::new(labels.clone(), [n]), &Default::default());
        let out = head_logps(tensor::<Flex, 2>(&hidden, [n, h]), tensor::<Flex, 2>(&weight, [h, vocab]), ids, options);
        assert_close("log-probs without autodiff", &host(out.logps), &want[0]);
    }
}

/// Attention that recomputes its probabilities in the backward pass against the materialised form
/// on the tape (`masked_softmax_ops`): output and the gradients of q, k and v, with a mask shared by
/// the heads that hides one query's every key, chunked by head (a tile of one head's scores) and whole.
#[test]
fn recomputed_attention_matches_the_materialised_form() {
    use dipole_kernels::attention::masked_softmax_ops;
    use dipole_kernels::recompute::{RecomputeOptions, try_recomputed_attention};
    let [b, h, tq, tk, d] = [2, 3, 5, 7, 4];
    let (q, k, v) = (values(b * h * tq * d, 0.2, 1.5), values(b * h * tk * d, 1.1, 1.5), values(b * h * tk * d, 2.3, 1.0));
    let w = values(b * h * tq * d, 3.7, 1.0);
    // causal with an offset of 2 keys; query 0 of row 1 sees nothing
    let hidden: Vec<bool> = (0..b * tq * tk).map(|i| {
        let (row, query, key) = (i / (tq * tk), i / tk % tq, i % tk);
        key > query + 2 || (row == 1 && query == 0)
    }).collect();
    let mask = || Tensor::<AD, 4, Bool>::from_data(TensorData::new(hidden.clone(), [b, 1, tq, tk]), &Default::default());
    let leaves = || (tensor::<AD, 4>(&q, [b, h, tq, d]).require_grad(), tensor::<AD, 4>(&k, [b, h, tk, d]).require_grad(), tensor::<AD, 4>(&v, [b, h, tk, d]).require_grad());
    let gradients = |out: Tensor<AD, 4>, (q, k, v): &(Tensor<AD, 4>, Tensor<AD, 4>, Tensor<AD, 4>)| {
        let grads = (out.clone() * tensor::<AD, 4>(&w, [b, h, tq, d])).sum().backward();
        [host(out), host(q.grad(&grads).unwrap()), host(k.grad(&grads).unwrap()), host(v.grad(&grads).unwrap())]
    };
    let x = leaves();
    let want = gradients(masked_softmax_ops(x.0.clone().matmul(x.1.clone().swap_dims(2, 3)), mask()).matmul(x.2.clone()), &x);
    assert!(want[0][b * h * tq * d - 1] != 0.0 && want[0][tq * d..tq * d + d].iter().all(|&o| o != 0.0));
    for tile_elements in [tq * tk, 1 << 20] {
        let x = leaves();
        let out = try_recomputed_attention((x.0.clone(), x.1.clone(), x.2.clone(), mask()), RecomputeOptions { tile_elements }).unwrap_or_else(|_| panic!("the op runs on Autodiff<Flex>"));
        let got = gradients(out, &x);
        for (name, (g, w)) in ["output", "q gradient", "k gradient", "v gradient"].iter().zip(got.iter().zip(&want)) {
            assert_close(&format!("{name}, tiles of {tile_elements}"), g, w);
        }
    }
    // without autodiff nothing would be kept: the inputs come back for the materialised form
    let ids = Tensor::<Flex, 4>::zeros([1, 1, 2, 2], &Default::default());
    let flex_mask = Tensor::<Flex, 4, Bool>::from_data(TensorData::new(vec![false; 4], [1, 1, 2, 2]), &Default::default());
    assert!(try_recomputed_attention((ids.clone(), ids.clone(), ids, flex_mask), RecomputeOptions::default()).is_err());
}
