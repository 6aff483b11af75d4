//! The benchmark's requests: prompt and output lengths drawn from log-normal distributions
//! shaped like ShareGPT conversations, prompts of random token ids (no dataset download).
//!
//! The means default to the ShareGPT statistics published with vLLM (PagedAttention paper:
//! 161.31 input and 337.99 output tokens on average); the log-normal shape σ is a modelling
//! choice (1.0 by default: lengths spread over about two orders of magnitude, with a long
//! tail), not a fit to the raw data. For a log-normal of mean `m` and shape `σ`,
//! `μ = ln m − σ²/2`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal};

use kvq::KvqError;

/// ShareGPT's mean prompt length in tokens (vLLM paper).
pub const SHAREGPT_INPUT_MEAN: f64 = 161.31;
/// ShareGPT's mean output length in tokens (vLLM paper).
pub const SHAREGPT_OUTPUT_MEAN: f64 = 337.99;
/// Default log-normal shape of both lengths.
pub const DEFAULT_SIGMA: f64 = 1.0;
/// Prompt token ids are drawn from `FIRST_ID..vocab`, above the special tokens that
/// tokenizers put first.
pub const FIRST_ID: u32 = 100;

/// How lengths are drawn.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct LengthDistribution {
    pub input_mean: f64,
    pub output_mean: f64,
    pub sigma: f64,
    /// Both lengths are multiplied by this (after drawing, before clipping), to run the
    /// same shape at a size a small machine finishes.
    pub scale: f64,
    /// Prompt plus output never exceed this; a prompt takes at most half of it.
    pub session_len: usize,
    /// Every prompt starts with the same this many tokens (a shared system prompt, as in
    /// vLLM's random-prefix benchmark), before its drawn length; 0: none.
    pub prefix_len: usize,
}

/// One request of the workload.
#[derive(Debug, Clone)]
pub struct Job {
    pub prompt: Vec<u32>,
    pub output_len: usize,
}

/// `n` requests, the same for a given seed whatever the configuration.
pub fn draw_jobs(
    d: &LengthDistribution,
    n: usize,
    vocab: usize,
    seed: u64,
) -> Result<Vec<Job>, KvqError> {
    let bad = |m: String| Err(KvqError::InvalidArgument(m));
    if !(d.input_mean > 0.0 && d.output_mean > 0.0 && d.sigma >= 0.0 && d.scale > 0.0) {
        return bad(format!(
            "length means, sigma and scale must be positive: {d:?}"
        ));
    }
    if d.session_len < 4 {
        return bad(format!("session_len {} is too short", d.session_len));
    }
    if d.prefix_len >= d.session_len / 2 {
        return bad(format!(
            "a shared prefix of {} tokens leaves no room in half of session_len {}",
            d.prefix_len, d.session_len
        ));
    }
    if vocab <= FIRST_ID as usize {
        return bad(format!(
            "a vocabulary of {vocab} leaves no ordinary token ids"
        ));
    }
    let log_normal = |mean: f64| {
        LogNormal::new(mean.ln() - d.sigma * d.sigma / 2.0, d.sigma)
            .map_err(|e| KvqError::InvalidArgument(format!("length distribution: {e}")))
    };
    let (inputs, outputs) = (log_normal(d.input_mean)?, log_normal(d.output_mean)?);
    let mut rng = StdRng::seed_from_u64(seed);
    let max_input = d.session_len / 2;
    let random_ids = |rng: &mut StdRng, len: usize| -> Vec<u32> {
        (0..len)
            .map(|_| rng.random_range(FIRST_ID..vocab as u32))
            .collect()
    };
    let prefix = random_ids(&mut rng, d.prefix_len);
    Ok((0..n)
        .map(|_| {
            let scaled = |x: f64| (x * d.scale).round().max(1.0) as usize;
            let own = scaled(inputs.sample(&mut rng)).min(max_input - d.prefix_len);
            let output = scaled(outputs.sample(&mut rng)).min(d.session_len - d.prefix_len - own);
            let prompt = [prefix.clone(), random_ids(&mut rng, own)].concat();
            Job {
                prompt,
                output_len: output,
            }
        })
        .collect())
}

/// Seconds after the start at which each request arrives, for a Poisson process of `rate`
/// requests per second (exponential gaps).
pub fn poisson_arrivals(n: usize, rate: f64, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            let u: f64 = rng.random();
            t += -(1.0 - u).ln() / rate;
            t
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dist(scale: f64, session_len: usize) -> LengthDistribution {
        LengthDistribution {
            input_mean: SHAREGPT_INPUT_MEAN,
            output_mean: SHAREGPT_OUTPUT_MEAN,
            sigma: DEFAULT_SIGMA,
            scale,
            session_len,
            prefix_len: 0,
        }
    }

    #[test]
    fn lengths_follow_the_means_and_respect_the_session() {
        let jobs = draw_jobs(&dist(1.0, 1 << 20), 20_000, 1000, 3).unwrap();
        let mean = |f: &dyn Fn(&Job) -> usize| {
            jobs.iter().map(|j| f(j) as f64).sum::<f64>() / jobs.len() as f64
        };
        let (i, o) = (mean(&|j| j.prompt.len()), mean(&|j| j.output_len));
        assert!((i / SHAREGPT_INPUT_MEAN - 1.0).abs() < 0.05, "{i}");
        assert!((o / SHAREGPT_OUTPUT_MEAN - 1.0).abs() < 0.05, "{o}");
        let short = draw_jobs(&dist(0.5, 128), 2000, 1000, 3).unwrap();
        for j in &short {
            assert!((1..=64).contains(&j.prompt.len()), "{}", j.prompt.len());
            assert!(j.output_len >= 1 && j.prompt.len() + j.output_len <= 128);
            assert!(j.prompt.iter().all(|&t| (FIRST_ID..1000).contains(&t)));
        }
    }

    #[test]
    fn a_shared_prefix_starts_every_prompt() {
        let d = LengthDistribution {
            prefix_len: 40,
            ..dist(0.5, 256)
        };
        let jobs = draw_jobs(&d, 200, 1000, 4).unwrap();
        for j in &jobs {
            assert_eq!(j.prompt[..40], jobs[0].prompt[..40]);
            assert!((41..=128).contains(&j.prompt.len()), "{}", j.prompt.len());
            assert!(j.prompt.len() + j.output_len <= 256);
        }
        assert_ne!(jobs[0].prompt[40..], jobs[1].prompt[40..]);
        let too_long = LengthDistribution {
            prefix_len: 128,
            ..dist(0.5, 256)
        };
        assert!(draw_jobs(&too_long, 1, 1000, 4).is_err());
    }

    #[test]
    fn the_seed_fixes_the_workload() {
        let a = draw_jobs(&dist(0.1, 512), 50, 500, 9).unwrap();
        let b = draw_jobs(&dist(0.1, 512), 50, 500, 9).unwrap();
        let c = draw_jobs(&dist(0.1, 512), 50, 500, 10).unwrap();
        let key = |v: &[Job]| {
            v.iter()
                .map(|j| (j.prompt.clone(), j.output_len))
                .collect::<Vec<_>>()
        };
        assert_eq!(key(&a), key(&b));
        assert_ne!(key(&a), key(&c));
    }

    #[test]
    fn poisson_gaps_average_one_over_the_rate() {
        let t = poisson_arrivals(20_000, 4.0, 1);
        assert!(t.windows(2).all(|w| w[1] > w[0]));
        let mean_gap = t.last().unwrap() / t.len() as f64;
        assert!((mean_gap - 0.25).abs() < 0.01, "{mean_gap}");
    }

    #[test]
    fn bad_distributions_are_refused() {
        let mut d = dist(1.0, 512);
        d.scale = 0.0;
        assert!(draw_jobs(&d, 1, 500, 0).is_err());
        assert!(draw_jobs(&dist(1.0, 2), 1, 500, 0).is_err());
        assert!(draw_jobs(&dist(1.0, 512), 1, 50, 0).is_err());
    }
}
