//! Choosing the next token from logits, as transformers' `generate` does: repetition penalty
//! over the prompt and the completion so far, OpenAI's presence and frequency penalties over
//! the completion so far, then greedy (temperature 0) or temperature,
//! top-k and top-p sampling with a seeded generator (same seed, same text).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::SamplingParams;

pub struct Sampler {
    temperature: f64,
    top_p: f64,
    top_k: Option<usize>,
    repetition_penalty: f32,
    presence_penalty: f32,
    frequency_penalty: f32,
    /// How often each token was chosen so far (for the presence and frequency penalties).
    chosen: std::collections::HashMap<u32, u32>,
    rng: StdRng,
    /// Scratch for the penalised token set.
    seen: Vec<bool>,
    /// Scratch for the token weights of a draw over the whole vocabulary.
    weights: Vec<f32>,
    logit_bias: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(p: &SamplingParams) -> Sampler {
        let rng = match p.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_entropy(),
        };
        Sampler {
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k,
            repetition_penalty: p.repetition_penalty,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            chosen: std::collections::HashMap::new(),
            rng,
            seen: Vec::new(),
            weights: Vec::new(),
            logit_bias: p.logit_bias.clone(),
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// The next token; `history` is every token of the sequence so far (prompt included).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        for &(t, b) in &self.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 {
            // OpenAI's rule: logit −= presence·[count > 0] + frequency·count, over the
            // tokens this sampler has chosen (the completion, not the prompt).
            for (&t, &n) in &self.chosen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= self.presence_penalty + self.frequency_penalty * n as f32;
                }
            }
        }
        let token = self.choose(logits, history);
        *self.chosen.entry(token).or_insert(0) += 1;
        token
    }

    fn choose(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        if self.repetition_penalty != 1.0 && self.repetition_penalty > 0.0 {
            self.seen.clear();
            self.seen.resize(logits.len(), false);
            let p = self.repetition_penalty;
            for &t in history {
                let t = t as usize;
                if t < logits.len() && !self.seen[t] {
                    self.seen[t] = true;
                    let l = &mut logits[t];
                    *l = if *l < 0.0 { *l * p } else { *l / p };
                }
            }
        }
        if self.is_greedy() {
            return argmax(logits);
        }
        let inv_t = (1.0 / self.temperature) as f32;
        // Candidates: the top-k (or every token), best first.
        let k = self
            .top_k
            .filter(|k| *k > 0)
            .unwrap_or(logits.len())
            .min(logits.len());
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if k == logits.len() && self.top_p >= 1.0 {
            // The whole distribution (the default): a draw needs no order, so one pass of
            // weights and one walk in token order, instead of sorting the vocabulary.
            self.weights.clear();
            let mut total = 0f64;
            self.weights.extend(logits.iter().map(|&l| {
                let w = ((l - max) * inv_t).exp();
                total += f64::from(w);
                w
            }));
            let mut r = self.rng.r#gen::<f64>() * total;
            let mut last = 0;
            for (t, &w) in self.weights.iter().enumerate() {
                if w > 0.0 {
                    last = t;
                    r -= f64::from(w);
                    if r <= 0.0 {
                        return t as u32;
                    }
                }
            }
            return last as u32;
        }
        // Probabilities without normalisation, relative to the best token.
        let weight = |l: f32| (((l - max) * inv_t) as f64).exp();
        let total_all: f64 = if k == logits.len() {
            logits.iter().map(|&l| weight(l)).sum()
        } else {
            0.0
        };
        // Grow the sorted head until it holds top_p of the mass (or all k tokens).
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let mut head = 64.min(k);
        let (cands, total) = loop {
            let by_logit = |a: &u32, b: &u32| {
                logits[*b as usize]
                    .partial_cmp(&logits[*a as usize])
                    .unwrap_or(std::cmp::Ordering::Equal)
            };
            if head < idx.len() {
                idx.select_nth_unstable_by(head, by_logit);
            }
            let mut top: Vec<u32> = idx[..head].to_vec();
            top.sort_by(by_logit);
            let total = if k == logits.len() {
                total_all
            } else if head == k {
                top.iter().map(|&t| weight(logits[t as usize])).sum()
            } else {
                // Top-k restricts the distribution to k tokens: need all of them.
                head = k;
                continue;
            };
            if self.top_p >= 1.0 {
                if head == k {
                    break (top, total);
                }
                head = k;
                continue;
            }
            let mut acc = 0.0;
            let mut cut = None;
            for (i, &t) in top.iter().enumerate() {
                acc += weight(logits[t as usize]);
                if acc >= self.top_p * total {
                    cut = Some(i + 1);
                    break;
                }
            }
            match cut {
                Some(n) => {
                    top.truncate(n);
                    let kept: f64 = top.iter().map(|&t| weight(logits[t as usize])).sum();
                    break (top, kept);
                }
                None if head == k => break (top, total),
                None => head = (head * 4).min(k),
            }
        };
        let mut r = self.rng.r#gen::<f64>() * total;
        for &t in &cands {
            r -= weight(logits[t as usize]);
            if r <= 0.0 {
                return t;
            }
        }
        cands.last().copied().unwrap_or(0)
    }
}

/// The index of the largest logit (the first one on ties, as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f64, top_p: f64, top_k: Option<usize>, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_p,
            top_k,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_and_penalty() {
        let mut s = Sampler::new(&params(0.0, 1.0, None, 1));
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9], &[]), 1);
        let mut p = params(0.0, 1.0, None, 1);
        p.repetition_penalty = 2.0;
        let mut s = Sampler::new(&p);
        // 3.0 / 2 = 1.5 < 2.9
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9], &[1, 1]), 2);
        let mut l = [-1.0f32, 0.5];
        s.sample(&mut l, &[0]);
        assert_eq!(l[0], -2.0, "negative logits are multiplied");
    }

    #[test]
    fn logit_bias_bans_and_forces_tokens() {
        let mut p = params(0.0, 1.0, None, 1);
        p.logit_bias = vec![(1, -100.0)];
        assert_eq!(
            Sampler::new(&p).sample(&mut [0.1, 3.0, 2.9], &[]),
            2,
            "1 banned"
        );
        p.logit_bias = vec![(0, 100.0), (7, 5.0)]; // an id past the vocabulary is ignored
        assert_eq!(
            Sampler::new(&p).sample(&mut [0.1, 3.0, 2.9], &[]),
            0,
            "0 forced"
        );
    }

    #[test]
    fn presence_and_frequency_penalties_count_chosen_tokens_only() {
        let mut p = params(0.0, 1.0, None, 1);
        p.presence_penalty = 0.5;
        p.frequency_penalty = 0.3;
        let mut s = Sampler::new(&p);
        // The prompt (history) is not penalised: token 1 wins the first time.
        assert_eq!(s.sample(&mut [0.0, 2.0, 1.5], &[1, 1, 1]), 1);
        // Chosen once: 2.0 − 0.5 − 0.3 = 1.2 < 1.5.
        let mut l = [0.0f32, 2.0, 1.5];
        assert_eq!(s.sample(&mut l, &[1, 1, 1, 1]), 2);
        assert!((l[1] - 1.2).abs() < 1e-6, "{l:?}");
        // Token 1 once, token 2 once: each −0.8.
        let mut l = [0.0f32, 2.0, 1.5];
        s.sample(&mut l, &[]);
        assert!(
            (l[1] - 1.2).abs() < 1e-6 && (l[2] - 0.7).abs() < 1e-6,
            "{l:?}"
        );
        // Negative penalties encourage repetition.
        let mut p = params(0.0, 1.0, None, 1);
        p.frequency_penalty = -2.0;
        let mut s = Sampler::new(&p);
        assert_eq!(s.sample(&mut [0.0, 1.0, 1.5], &[]), 2);
        assert_eq!(s.sample(&mut [0.0, 1.0, 1.5], &[]), 2);
    }

    #[test]
    fn same_seed_same_choices_and_top_k_top_p_limits() {
        let logits: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
            .collect();
        let run = |p: &SamplingParams| {
            let mut s = Sampler::new(p);
            (0..50)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        let a = run(&params(1.0, 0.9, None, 7));
        assert_eq!(a, run(&params(1.0, 0.9, None, 7)));
        assert_ne!(a, run(&params(1.0, 0.9, None, 8)));
        // top_k = 1 is greedy.
        let best = argmax(&logits);
        assert!(
            run(&params(1.0, 1.0, Some(1), 3))
                .iter()
                .all(|&t| t == best)
        );
        // A tiny top_p keeps only the best token.
        assert!(run(&params(1.0, 1e-9, None, 3)).iter().all(|&t| t == best));
        // top_k = 3: only the three best tokens appear.
        let mut sorted: Vec<u32> = (0..1000).collect();
        sorted.sort_by(|a, b| {
            logits[*b as usize]
                .partial_cmp(&logits[*a as usize])
                .unwrap()
        });
        let top3 = &sorted[..3];
        let seen = run(&params(5.0, 1.0, Some(3), 4));
        assert!(seen.iter().all(|t| top3.contains(t)), "{seen:?}");
    }

    #[test]
    fn the_whole_distribution_is_drawn_in_proportion() {
        // Probabilities 0.5, 0.3, 0.2 at temperature 1, no top_k/top_p; a temperature of 2
        // flattens them to √0.5 : √0.3 : √0.2.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        for (t, want) in [(1.0, [0.5, 0.3, 0.2]), (2.0, [0.4154, 0.3218, 0.2628])] {
            let mut s = Sampler::new(&params(t, 1.0, None, 5));
            let mut counts = [0usize; 3];
            for _ in 0..6000 {
                counts[s.sample(&mut logits.clone(), &[]) as usize] += 1;
            }
            for (c, w) in counts.iter().zip(want) {
                let share = *c as f64 / 6000.0;
                assert!((share - w).abs() < 0.025, "t={t}: {counts:?}");
            }
        }
    }

    #[test]
    fn top_p_matches_the_distribution() {
        // Probabilities 0.5, 0.3, 0.2 at temperature 1: top_p 0.7 keeps the first two.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let mut s = Sampler::new(&params(1.0, 0.7, None, 11));
        let mut counts = [0usize; 3];
        for _ in 0..4000 {
            counts[s.sample(&mut logits.clone(), &[]) as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        let share = counts[0] as f64 / 4000.0;
        assert!((share - 0.625).abs() < 0.03, "{counts:?}");
    }
}
