//! Autoregressive decoding with a KV cache: greedy, temperature and nucleus (top-p) sampling.

use burn::tensor::{Tensor, backend::Backend};

use crate::llama::{CausalLm, KvCache, ids_tensor};
use crate::rng::SeededRng;

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 means greedy decoding.
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f64,
    /// Generation stops after any of these tokens (which is kept in the output).
    pub stop_tokens: Vec<u32>,
    pub seed: u64,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            stop_tokens: Vec::new(),
            seed: 0,
        }
    }
}

impl<B: Backend> CausalLm<B> {
    /// Continues `prompt` and returns the new tokens only.
    pub fn generate(&self, prompt: &[u32], options: &GenerateOptions) -> Vec<u32> {
        assert!(!prompt.is_empty(), "generation needs at least one prompt token");
        let device = self.embed_tokens.device();
        let mut rng = SeededRng::new(options.seed);
        let mut cache = KvCache::new(self.layers.len());
        let mut out = Vec::new();
        let mut next_input = prompt.to_vec();
        for _ in 0..options.max_new_tokens {
            let ids = ids_tensor::<B>(&[next_input.clone()], &device);
            let hidden = self.forward_hidden(ids, None, Some(&mut cache));
            let [_, len, h] = hidden.dims();
            let last: Tensor<B, 1> = self.logits(hidden.slice([0..1, len - 1..len, 0..h])).flatten(0, 2);
            let logits: Vec<f32> = last.into_data().convert::<f32>().to_vec().expect("f32 logits");
            let token = pick(&logits, options, &mut rng);
            out.push(token);
            if options.stop_tokens.contains(&token) {
                break;
            }
            next_input = vec![token];
        }
        out
    }
}

/// Chooses the next token from `logits` under the decoding options.
pub fn pick(logits: &[f32], options: &GenerateOptions, rng: &mut SeededRng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &l)| if l > best.1 { (i, l) } else { best })
            .0 as u32
    };
    if options.temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, ((l as f64 - max) / options.temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        kept += 1;
        mass += p.1;
        if mass >= options.top_p {
            break;
        }
    }
    let probs = &probs[..kept];
    let mut r = rng.uniform() * mass;
    for &(i, p) in probs {
        if r < p {
            return i as u32;
        }
        r -= p;
    }
    probs[kept - 1].0 as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax() {
        let mut rng = SeededRng::new(0);
        assert_eq!(pick(&[0.1, 3.0, -1.0], &GenerateOptions::default(), &mut rng), 1);
    }

    #[test]
    fn top_p_excludes_the_tail() {
        let mut rng = SeededRng::new(0);
        let options = GenerateOptions {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        // token 0 holds ~0.88 of the mass: with top_p 0.5 it is the only candidate
        for _ in 0..50 {
            assert_eq!(pick(&[4.0, 2.0, 0.0], &options, &mut rng), 0);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let mut rng = SeededRng::new(1);
        let options = GenerateOptions {
            temperature: 1.0,
            ..Default::default()
        };
        let logits = [0.0f32, (3.0f32).ln()]; // p = [0.25, 0.75]
        let ones = (0..4000).filter(|_| pick(&logits, &options, &mut rng) == 1).count();
        assert!((2850..3150).contains(&ones), "{ones}");
    }
}
