//! Latency summaries of a benchmark run: per-request token timestamps turned into TTFT, TPOT
//! and inter-token latency (mean, p50, p99).

use std::time::Instant;

/// What one request saw.
#[derive(Debug, Clone)]
pub struct RequestTrace {
    pub submitted: Instant,
    /// When each token event arrived (tokens verified together arrive together).
    pub tokens: Vec<Instant>,
    pub prompt_len: usize,
}

/// Mean, median and 99th percentile (nearest rank), in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Summary {
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
    pub count: usize,
}

impl Summary {
    /// Of `values` (ms); all zero for none.
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| v[((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Self {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: rank(50.0),
            p99: rank(99.0),
            count: v.len(),
        }
    }
}

/// TTFT (submit to first token), TPOT (first to last token over the tokens after the first,
/// requests of two or more tokens) and ITL (every gap between consecutive tokens), in ms.
pub fn latencies(traces: &[RequestTrace]) -> (Summary, Summary, Summary) {
    let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
    let mut ttft = Vec::new();
    let mut tpot = Vec::new();
    let mut itl = Vec::new();
    for t in traces {
        let (Some(&first), Some(&last)) = (t.tokens.first(), t.tokens.last()) else {
            continue;
        };
        ttft.push(ms(t.submitted, first));
        if t.tokens.len() > 1 {
            tpot.push(ms(first, last) / (t.tokens.len() - 1) as f64);
        }
        itl.extend(t.tokens.windows(2).map(|w| ms(w[0], w[1])));
    }
    (Summary::of(&ttft), Summary::of(&tpot), Summary::of(&itl))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Summary::of(&v);
        assert_eq!((s.p50, s.p99, s.count), (50.0, 99.0, 100));
        assert_eq!(s.mean, 50.5);
        let s = Summary::of(&[3.0]);
        assert_eq!((s.mean, s.p50, s.p99), (3.0, 3.0, 3.0));
        assert_eq!(Summary::of(&[]).count, 0);
    }

    #[test]
    fn ttft_tpot_and_itl_from_timestamps() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let traces = [
            RequestTrace {
                submitted: t0,
                tokens: vec![at(100), at(110), at(130)],
                prompt_len: 5,
            },
            RequestTrace {
                submitted: at(10),
                tokens: vec![at(50)],
                prompt_len: 5,
            },
        ];
        let (ttft, tpot, itl) = latencies(&traces);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        assert!(close(ttft.mean, 70.0) && close(ttft.p99, 100.0), "{ttft:?}");
        assert!(tpot.count == 1 && close(tpot.mean, 15.0), "{tpot:?}");
        assert!(
            itl.count == 2 && close(itl.mean, 15.0) && close(itl.p99, 20.0),
            "{itl:?}"
        );
    }
}
