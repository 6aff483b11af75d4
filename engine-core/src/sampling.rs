//! Token sampling: greedy, temperature, top-k, top-p (nucleus), repetition, presence and
//! frequency penalties, with a seed so runs repeat exactly; and the log-probabilities of the
//! chosen token and its top alternatives.

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
    /// OpenAI's presence penalty: subtracted once from the logit of every token already
    /// generated (the prompt does not count, as in vLLM); 0 disables; -2 to 2.
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty: subtracted from a generated token's logit once per time it
    /// was generated; 0 disables; -2 to 2.
    pub frequency_penalty: f32,
    /// Report the log-probability of each generated token and of this many most likely
    /// alternatives (0 to [`MAX_TOP_LOGPROBS`]); `None`: no log-probabilities.
    pub logprobs: Option<usize>,
    /// Also report the log-probability of every prompt token after the first (given the
    /// tokens before it) and of this many alternatives (vLLM's `prompt_logprobs`; what the
    /// completions API's `echo` with `logprobs` returns). The prefill then computes a logits
    /// row per prompt token.
    pub prompt_logprobs: Option<usize>,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// Keep generating past the model's end-of-sequence token (until `max_new_tokens` or the
    /// session length; the request's own stop ids still stop it), for benchmarks.
    pub ignore_eos: bool,
}

/// The most alternatives a request may ask log-probabilities for (OpenAI's `top_logprobs`).
pub const MAX_TOP_LOGPROBS: usize = 20;

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logprobs: None,
            prompt_logprobs: None,
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
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if let Some(n) = [self.logprobs, self.prompt_logprobs]
            .into_iter()
            .flatten()
            .find(|&n| n > MAX_TOP_LOGPROBS)
        {
            return Err(format!(
                "at most {MAX_TOP_LOGPROBS} top log-probabilities per token, asked for {n}"
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
    /// penalty) and no log-probabilities are wanted, so a device can pick the token where the
    /// logits are and send back only its id.
    pub fn is_plain_greedy(&self) -> bool {
        let p = &self.params;
        p.temperature == 0.0
            && p.repetition_penalty == 1.0
            && p.presence_penalty == 0.0
            && p.frequency_penalty == 0.0
            && p.logprobs.is_none()
            && p.prompt_logprobs.is_none()
    }

    /// Picks the next token from `logits` given the sequence so far (`tokens`, of which the
    /// first `prompt_len` are the prompt).
    pub fn sample(&mut self, logits: &[f32], tokens: &[u32], prompt_len: usize) -> u32 {
        let mut logits = logits.to_vec();
        apply_repetition_penalty(&mut logits, tokens, self.params.repetition_penalty);
        apply_presence_frequency_penalties(
            &mut logits,
            tokens.get(prompt_len..).unwrap_or_default(),
            self.params.presence_penalty,
            self.params.frequency_penalty,
        );
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

/// OpenAI's presence and frequency penalties over the generated tokens: a token's logit loses
/// `presence` if it was generated at all and `frequency` per time it was.
pub fn apply_presence_frequency_penalties(
    logits: &mut [f32],
    generated: &[u32],
    presence: f32,
    frequency: f32,
) {
    if presence == 0.0 && frequency == 0.0 {
        return;
    }
    let mut counts = std::collections::HashMap::<u32, u32>::new();
    for &t in generated {
        *counts.entry(t).or_default() += 1;
    }
    for (t, n) in counts {
        if let Some(l) = logits.get_mut(t as usize) {
            *l -= presence + frequency * n as f32;
        }
    }
}

/// The log-probability of a chosen token and of the most likely tokens at its position.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    /// The `n` most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprobs {
    /// Log-probabilities under the model's own distribution (log-softmax of the raw logits,
    /// before penalties, temperature and truncation, as OpenAI and vLLM report them), so they
    /// do not change with the sampling settings. A NaN logit counts as impossible.
    pub fn from_logits(logits: &[f32], token: u32, n: usize) -> Self {
        let clean = |l: f32| if l.is_nan() { f32::NEG_INFINITY } else { l };
        let max = logits
            .iter()
            .map(|&l| clean(l))
            .fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits
            .iter()
            .map(|&l| f64::from(clean(l) - max).exp())
            .sum();
        let log_z = max + sum.ln() as f32;
        let logprob = |t: u32| {
            logits
                .get(t as usize)
                .map_or(f32::NEG_INFINITY, |&l| clean(l) - log_z)
        };
        // Only a request for alternatives pays for ordering the vocabulary.
        let n = n.min(logits.len());
        let mut order: Vec<u32> = if n > 0 {
            (0..logits.len() as u32).collect()
        } else {
            Vec::new()
        };
        let by_logit = |a: &u32, b: &u32| {
            clean(logits[*b as usize])
                .total_cmp(&clean(logits[*a as usize]))
                .then(a.cmp(b))
        };
        if n > 0 && n < order.len() {
            order.select_nth_unstable_by(n - 1, by_logit);
        }
        order.truncate(n);
        order.sort_unstable_by(by_logit);
        Self {
            token,
            logprob: logprob(token),
            top: order.into_iter().map(|t| (t, logprob(t))).collect(),
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
        assert_eq!(s.sample(&[0.1, 3.0, f32::NAN, 2.9], &[], 0), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut s = Sampler::new(params(5.0, 1, 1.0, 7));
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.0, 1.0, 0.5], &[], 0), 1);
        }
    }

    #[test]
    fn top_p_excludes_the_tail() {
        // p(0) ≈ 0.84 after softmax; top_p 0.5 keeps only token 0.
        let mut s = Sampler::new(params(1.0, 0, 0.5, 3));
        for _ in 0..50 {
            assert_eq!(s.sample(&[2.0, 0.0, -1.0], &[], 0), 0);
        }
    }

    #[test]
    fn same_seed_same_tokens_and_frequencies_follow_probabilities() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = 0.25, 0.75
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed));
            (0..4000)
                .map(|_| s.sample(&logits, &[], 0))
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
        assert_eq!(s.sample(&[2.0, 1.9], &[0], 1), 1);
    }

    #[test]
    fn presence_and_frequency_penalties_count_generated_tokens_only() {
        let mut l = vec![1.0, 1.0, 1.0, 1.0];
        apply_presence_frequency_penalties(&mut l, &[1, 2, 2], 0.5, 0.25);
        assert_eq!(l, vec![1.0, 0.25, 0.0, 1.0]);
        // Token 0 is only in the prompt: a presence penalty leaves it alone; token 1 was
        // generated and falls behind token 2.
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 2.0,
            ..Default::default()
        });
        assert!(!s.is_plain_greedy());
        assert_eq!(s.sample(&[3.0, 2.5, 1.0], &[0, 1], 1), 0);
        assert_eq!(s.sample(&[2.0, 2.5, 1.0], &[0, 1], 1), 0);
        assert_eq!(s.sample(&[0.0, 2.5, 1.0], &[0, 1], 1), 2);
        // Negative values encourage repeats.
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: -1.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&[1.0, 0.5], &[1], 0), 1);
    }

    #[test]
    fn logprobs_are_the_log_softmax_of_the_raw_logits() {
        let logits = [1.0f32, 3.0, f32::NAN, 2.0, 3.0];
        let lp = TokenLogprobs::from_logits(&logits, 3, 3);
        let z: f64 = [1.0f64, 3.0, 2.0, 3.0].iter().map(|l| l.exp()).sum();
        let want = |l: f64| (l - z.ln()) as f32;
        assert!((lp.logprob - want(2.0)).abs() < 1e-6, "{lp:?}");
        // Most likely first, ties by id; the NaN entry never appears.
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 4, 3]);
        for &(t, p) in &lp.top {
            assert!((p - want(f64::from(logits[t as usize]))).abs() < 1e-6);
        }
        let probs: f64 = (0..5)
            .map(|t| f64::from(TokenLogprobs::from_logits(&logits, t, 0).logprob).exp())
            .sum();
        assert!((probs - 1.0).abs() < 1e-6, "{probs}");
        assert_eq!(TokenLogprobs::from_logits(&logits, 2, 9).top.len(), 5);
        assert_eq!(
            TokenLogprobs::from_logits(&logits, 2, 0).logprob,
            f32::NEG_INFINITY
        );
    }

    #[test]
    fn logprobs_make_greedy_run_on_the_host() {
        let s = Sampler::new(SamplingParams {
            logprobs: Some(0),
            ..Default::default()
        });
        assert!(!s.is_plain_greedy());
        assert!(Sampler::new(SamplingParams::default()).is_plain_greedy());
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
        let p = SamplingParams {
            presence_penalty: 2.5,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().contains("presence_penalty"));
        let p = SamplingParams {
            frequency_penalty: f32::NAN,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().contains("frequency_penalty"));
        let p = SamplingParams {
            logprobs: Some(21),
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().contains("log-probabilities"));
    }
}
