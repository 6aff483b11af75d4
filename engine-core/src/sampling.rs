//! Token sampling: greedy, temperature, top-k, top-p (nucleus) and repetition penalty, with
//! a seed so runs repeat exactly.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Sampling settings of one request (OpenAI/LMDeploy names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1 disables.
    pub top_p: f32,
    /// Above 1 discourages tokens already in the context (CTRL-style: logits divided or
    /// multiplied by it); 1 disables.
    pub repetition_penalty: f32,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// Keep generating past the model's end-of-sequence token (until `max_new_tokens` or the
    /// session length; the request's own stop ids still stop it), for benchmarks.
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            max_new_tokens: 128,
            seed: 0,
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    /// Checks ranges; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature must be ≥ 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// A per-request sampler holding its random state.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether [`Sampler::sample`] is plain [`argmax`] of the logits (temperature 0, no
    /// repetition penalty), which a device can compute where the logits are.
    pub fn is_plain_greedy(&self) -> bool {
        self.params.temperature == 0.0 && self.params.repetition_penalty == 1.0
    }

    /// Picks the next token from `logits` given the tokens seen so far.
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        let mut logits = logits.to_vec();
        apply_repetition_penalty(&mut logits, context, self.params.repetition_penalty);
        if self.params.temperature == 0.0 {
            return argmax(&logits);
        }
        let mut cands: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_nan())
            .map(|(i, &l)| (i as u32, l / self.params.temperature))
            .collect();
        cands.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if self.params.top_k > 0 {
            cands.truncate(self.params.top_k.max(1));
        }
        let max = cands.first().map(|c| c.1).unwrap_or(0.0);
        let mut probs: Vec<f32> = cands.iter().map(|c| (c.1 - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            let mut cum = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cum += p;
                    cum >= self.params.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut u = self.rng.random::<f32>() * total;
        for (i, p) in probs.iter().enumerate() {
            u -= p;
            if u <= 0.0 {
                return cands[i].0;
            }
        }
        cands[probs.len() - 1].0
    }
}

/// Index of the largest logit (the first on ties; NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

/// CTRL-style penalty: a seen token's positive logit is divided by `penalty`, a negative one
/// multiplied, each token once.
pub fn apply_repetition_penalty(logits: &mut [f32], context: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &t in context {
        let t = t as usize;
        if t < logits.len() && !seen[t] {
            seen[t] = true;
            let l = &mut logits[t];
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, f32::NAN, 2.9], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut s = Sampler::new(params(5.0, 1, 1.0, 7));
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.0, 1.0, 0.5], &[]), 1);
        }
    }

    #[test]
    fn top_p_excludes_the_tail() {
        // p(0) ≈ 0.84 after softmax; top_p 0.5 keeps only token 0.
        let mut s = Sampler::new(params(1.0, 0, 0.5, 3));
        for _ in 0..50 {
            assert_eq!(s.sample(&[2.0, 0.0, -1.0], &[]), 0);
        }
    }

    #[test]
    fn same_seed_same_tokens_and_frequencies_follow_probabilities() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = 0.25, 0.75
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed));
            (0..4000)
                .map(|_| s.sample(&logits, &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(11), draw(11));
        let ones = draw(12).iter().filter(|t| **t == 1).count() as f64 / 4000.0;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut l = vec![2.0, 1.9, -1.0];
        apply_repetition_penalty(&mut l, &[0, 0, 2], 2.0);
        assert_eq!(l, vec![1.0, 1.9, -2.0]);
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&[2.0, 1.9], &[0]), 1);
    }

    #[test]
    fn ignore_eos_defaults_to_false_in_serde() {
        let p: SamplingParams = serde_json::from_str(r#"{"max_new_tokens": 4}"#).unwrap();
        assert!(!p.ignore_eos);
        let p: SamplingParams = serde_json::from_str(r#"{"ignore_eos": true}"#).unwrap();
        assert!(p.ignore_eos && p.max_new_tokens == 128);
    }

    #[test]
    fn invalid_values_are_named() {
        assert!(params(-1.0, 0, 1.0, 0)
            .validate()
            .unwrap_err()
            .contains("temperature"));
        assert!(params(1.0, 0, 0.0, 0)
            .validate()
            .unwrap_err()
            .contains("top_p"));
    }
}
