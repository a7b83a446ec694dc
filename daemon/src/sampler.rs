//! Token sampling and stop strings: the last stage of each decoding step. The engine owns one
//! [`Sampler`] per request and calls [`Sampler::sample`] once per generated token with that
//! step's logits; the decoded text then passes through the request's [`StopMatcher`] before it
//! is streamed to the transport. The request fields (`temperature`, `top_k`, `top_p`, `min_p`,
//! `repetition_penalty`, `seed`, `stop`; DESIGN.md "Transports") are checked once, by
//! [`SamplingParams::validate`], so bad input becomes `invalid_request`, never a panic.
//!
//! Semantics follow Hugging Face transformers' `generate()` logits processors, in their order:
//! repetition penalty, temperature, top-k, top-p, min-p, then one draw from the softmax of the
//! survivors. The PRNG is written out here (xoshiro256** seeded by splitmix64), so a seed gives
//! the same tokens on every platform and after any dependency upgrade.

use std::time::{SystemTime, UNIX_EPOCH};

/// Request-level sampling settings (OpenAI chat field names).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits; 0 means greedy (argmax, ties to the lowest id).
    pub temperature: f32,
    /// Keep only the `top_k` highest logits (ties with the k-th are kept); 0 = off.
    pub top_k: usize,
    /// Nucleus: keep the smallest set of most likely tokens whose probabilities sum to at least
    /// `top_p`; in (0, 1], 1 = off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; in [0, 1), 0 = off.
    pub min_p: f32,
    /// CTRL-style penalty on every token already in the history; > 0, 1 = off.
    pub repetition_penalty: f32,
    /// PRNG seed; `None` seeds from OS entropy and the clock, once, in [`Sampler::new`].
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    /// Plain sampling from the model's distribution: every filter off, no seed.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: None,
        }
    }
}

/// A sampling setting out of range; `field` is the request field's name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SamplingError {
    pub field: &'static str,
    pub reason: String,
}

/// Above this any real model's distribution is flattened to noise: a typo, not a request.
const MAX_TEMPERATURE: f32 = 100.0;

/// Relative slack on the nucleus boundary. Logits are f32, so a cumulative probability meant to
/// equal `top_p` exactly (0.5 + 0.3 = 0.8) lands a few ulps either side; within this slack the
/// boundary token counts as reaching `top_p`, as the contract "cumulative >= top_p" intends.
const NUCLEUS_SLACK: f64 = 1e-6;

impl SamplingParams {
    pub fn validate(&self) -> Result<(), SamplingError> {
        let (t, q, m, r) = (
            self.temperature,
            self.top_p,
            self.min_p,
            self.repetition_penalty,
        );
        // (field, holds, rule); NaN fails every rule.
        let rules = [
            ("temperature", t >= 0.0, "must be >= 0 (0 = greedy)", t),
            ("temperature", t <= MAX_TEMPERATURE, "must be <= 100", t),
            (
                "top_p",
                q > 0.0 && q <= 1.0,
                "must be in (0, 1] (1 = off)",
                q,
            ),
            (
                "min_p",
                (0.0..1.0).contains(&m),
                "must be in [0, 1) (0 = off)",
                m,
            ),
            (
                "repetition_penalty",
                r > 0.0 && r.is_finite(),
                "must be finite and > 0 (1 = off)",
                r,
            ),
        ];
        match rules.into_iter().find(|rule| !rule.1) {
            Some((field, _, rule, got)) => Err(SamplingError {
                field,
                reason: format!("{rule}, got {got}"),
            }),
            None => Ok(()),
        }
    }
}

/// Picks tokens for one request. Owns its PRNG and scratch buffers: after
/// [`Sampler::reserve`] (or the first call), [`Sampler::sample`] allocates nothing while the
/// vocabulary size stays the same. `top_k` up to [`HEAP_TOP_K`] (every usual setting: 40 in
/// llama.cpp and Ollama, 50 in transformers) finds the k-th largest logit in a fixed-capacity
/// heap in one pass; a larger k selects in a vocabulary-sized scratch buffer.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// This step's logits after the repetition penalty; len = vocab.
    logits: Vec<f32>,
    /// History ids already penalized this step; len = vocab, all false between calls.
    seen: Vec<bool>,
    /// Surviving (logit / temperature, token id), in a canonical order: ascending id, or
    /// (descending logit, ascending id) once top-p has sorted them. Draws never depend on the
    /// sort algorithm, so a seed's tokens survive std upgrades.
    cands: Vec<(f64, u32)>,
    /// Scratch for finding the k-th largest logit when `top_k` > [`HEAP_TOP_K`].
    kth: Vec<f64>,
}

/// The largest `top_k` whose candidates a fixed-capacity heap holds.
pub const HEAP_TOP_K: usize = 128;

/// A logit ordered by `f64::total_cmp`, for the top-k heap.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Key(f64);

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// The `k`-th largest of `values` (1 <= k <= HEAP_TOP_K, k < their number), kept in a
/// min-heap of the k largest seen so far.
fn kth_largest(values: impl Iterator<Item = f64>, k: usize) -> f64 {
    let mut heap: heapless::binary_heap::BinaryHeap<Key, heapless::binary_heap::Min, HEAP_TOP_K> =
        heapless::binary_heap::BinaryHeap::new();
    for v in values.map(Key) {
        if heap.len() < k {
            let _ = heap.push(v);
        } else if let Some(mut least) = heap.peek_mut()
            && v > *least
        {
            *least = v;
        }
    }
    heap.peek().map_or(f64::NEG_INFINITY, |k| k.0)
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        let rng = Rng::new(params.seed.unwrap_or_else(entropy_seed));
        Ok(Self {
            params,
            rng,
            logits: Vec::new(),
            seen: Vec::new(),
            cands: Vec::new(),
            kth: Vec::new(),
        })
    }

    /// Sizes the scratch buffers for a `vocab`-entry vocabulary, so that no call allocates.
    pub fn reserve(&mut self, vocab: usize) {
        let filters = self.params.temperature > 0.0;
        let penalty = self.params.repetition_penalty != 1.0;
        if filters || penalty {
            self.logits.reserve(vocab);
        }
        if penalty {
            self.seen.resize(vocab, false);
        }
        if filters {
            self.cands.reserve(vocab);
            if self.params.top_k > HEAP_TOP_K {
                self.kth.reserve(vocab);
            }
        }
    }

    /// Picks the next token from `logits` (len = vocab). `history`: prompt + generated ids so
    /// far (for the repetition penalty; ids >= vocab are ignored). `-inf` and NaN logits are
    /// never drawn; if every logit is, the argmax rule decides (0 for an empty slice).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        if self.params.temperature == 0.0 && self.params.repetition_penalty == 1.0 {
            // Plain greedy: no copy of the logits.
            return argmax(logits);
        }
        self.penalize(logits, history);
        if self.params.temperature == 0.0 {
            return argmax(&self.logits);
        }
        self.filter();
        self.draw()
    }

    /// [`Sampler::sample`] among the tokens `allowed` lets through (a bit set: bit `id % 32` of
    /// word `id / 32`; ids past it are not allowed), every other logit taken as `-inf` before
    /// the penalty, temperature and filters. With nothing allowed, the argmax rule picks 0.
    pub fn sample_masked(&mut self, logits: &[f32], history: &[u32], allowed: &[u32]) -> u32 {
        let ok = |i: usize| {
            allowed
                .get(i / 32)
                .is_some_and(|w| (w >> (i % 32)) & 1 == 1)
        };
        if self.params.temperature == 0.0 && self.params.repetition_penalty == 1.0 {
            // Greedy: the best allowed logit, ties to the lowest id, no copy.
            let mut best: Option<(f32, u32)> = None;
            for (i, &l) in logits.iter().enumerate() {
                if ok(i) && !l.is_nan() && best.is_none_or(|(b, _)| l > b) {
                    best = Some((l, i as u32));
                }
            }
            return best.map_or(0, |(_, i)| i);
        }
        self.penalize(logits, history);
        for (i, l) in self.logits.iter_mut().enumerate() {
            if !ok(i) {
                *l = f32::NEG_INFINITY;
            }
        }
        if self.params.temperature == 0.0 {
            return argmax(&self.logits);
        }
        self.filter();
        self.draw()
    }

    /// transformers' RepetitionPenaltyLogitsProcessor: once per distinct id in `history`,
    /// a negative logit is multiplied by the penalty and a positive one divided by it.
    fn penalize(&mut self, logits: &[f32], history: &[u32]) {
        self.logits.clear();
        self.logits.extend_from_slice(logits);
        let p = self.params.repetition_penalty;
        if p == 1.0 {
            return;
        }
        self.seen.resize(logits.len(), false);
        for &id in history {
            let i = id as usize;
            match self.seen.get_mut(i) {
                Some(seen) if !*seen => *seen = true,
                _ => continue,
            }
            let l = self.logits[i];
            self.logits[i] = if l < 0.0 { l * p } else { l / p };
        }
        for &id in history {
            if let Some(seen) = self.seen.get_mut(id as usize) {
                *seen = false;
            }
        }
    }

    /// Temperature, top-k, top-p and min-p, leaving the survivors in `cands`.
    fn filter(&mut self) {
        let Self {
            params,
            logits,
            cands,
            kth,
            ..
        } = self;
        let SamplingParams {
            top_k,
            top_p,
            min_p,
            ..
        } = *params;
        // f64 so that a tiny temperature cannot overflow a finite logit to +inf.
        let t = f64::from(params.temperature);
        let live = logits
            .iter()
            .zip(0u32..)
            .filter(|(l, _)| **l > f32::NEG_INFINITY);
        cands.clear();
        cands.extend(live.map(|(&l, id)| (f64::from(l) / t, id)));

        if top_k > 0 && top_k < cands.len() {
            let kth = if top_k <= HEAP_TOP_K {
                kth_largest(cands.iter().map(|c| c.0), top_k)
            } else {
                kth.clear();
                kth.extend(cands.iter().map(|c| c.0));
                let (_, &mut k, _) = kth.select_nth_unstable_by(top_k - 1, |a, b| b.total_cmp(a));
                k
            };
            cands.retain(|c| c.0 >= kth); // ties with the k-th stay, as in transformers
        }
        if top_p < 1.0 && cands.len() > 1 {
            cands.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let max = cands[0].0;
            let total: f64 = cands.iter().map(|c| weight(c.0, max)).sum();
            let target = (f64::from(top_p) - NUCLEUS_SLACK) * total;
            let mut cum = 0.0;
            let reached = cands.iter().position(|c| {
                cum += weight(c.0, max);
                cum >= target
            });
            cands.truncate(reached.map_or(cands.len(), |i| i + 1));
        }
        if min_p > 0.0 {
            // p_i >= min_p * p_max  <=>  l_i >= l_max + ln(min_p): no softmax needed.
            let floor = max_logit(cands) + f64::from(min_p).ln();
            cands.retain(|c| c.0 >= floor);
        }
    }

    /// One draw from the softmax of `cands`, accumulated in f64.
    fn draw(&mut self) -> u32 {
        let max = max_logit(&self.cands);
        let mut total = 0.0;
        for c in &self.cands {
            total += weight(c.0, max);
        }
        let u = self.rng.next_f64() * total;
        let (mut cum, mut last) = (0.0, None);
        for &(l, id) in &self.cands {
            let w = weight(l, max);
            cum += w;
            if u < cum {
                return id;
            }
            last = if w > 0.0 { Some(id) } else { last };
        }
        // Only reached when `u` rounded up to `total`, or nothing survived.
        last.unwrap_or_else(|| argmax(&self.logits))
    }
}

/// Unnormalized softmax weight; `l == max` gives 1 even when both are +inf.
fn weight(l: f64, max: f64) -> f64 {
    if l == max { 1.0 } else { (l - max).exp() }
}

fn max_logit(cands: &[(f64, u32)]) -> f64 {
    cands.iter().map(|c| c.0).fold(f64::NEG_INFINITY, f64::max)
}

/// Index of the largest logit, ties to the lowest id; NaN never wins.
fn argmax(logits: &[f32]) -> u32 {
    // Two passes that vectorize (max, then its first position) beat one branchy pass on a
    // 150k-entry vocabulary. NaN never wins; ties go to the lowest id; all -inf/NaN gives 0.
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    logits
        .iter()
        .position(|&l| l == max)
        .map_or(0, |i| i as u32)
}

/// A seed for requests without one: the std hasher's per-process OS entropy, mixed with the clock.
fn entropy_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// xoshiro256** (Blackman and Vigna), seeded through splitmix64 as its authors recommend.
#[derive(Debug, Clone)]
struct Rng {
    s: [u64; 4],
}

impl Rng {
    fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut splitmix64 = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let z = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self {
            s: [splitmix64(), splitmix64(), splitmix64(), splitmix64()],
        }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let out = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in [0, 1), from the top 53 bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Most stop strings a request may give (OpenAI allows 4; generous, but bounded).
pub const MAX_STOPS: usize = 16;
/// Most bytes of one stop string.
pub const MAX_STOP_BYTES: usize = 256;

/// A stop string held in place: the request's stops live in the matcher, not on the heap.
type Stop = heapless::String<MAX_STOP_BYTES>;

/// Finds stop strings in generated text across token boundaries, holding back only text that
/// could still be the start of a stop string. Generation ends at the first stop string completed;
/// if several complete in the same push, the one starting earliest in the text wins.
///
/// Allocation-free after [`StopMatcher::new`]: the stops are fixed-capacity strings, and the
/// held-back text shares one buffer, sized for the longest stop plus the longest piece of text
/// one token can add.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    /// Non-empty stop strings (an empty one would match before any text; it is ignored).
    stops: heapless::Vec<Stop, MAX_STOPS>,
    /// Longest stop in bytes: at most `longest - 1` bytes are ever held back.
    longest: usize,
    /// Text received but not yet emitted: after a push, always a proper prefix of some stop.
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops`; `max_piece`: the most text one push brings (so the buffer never
    /// grows). More than [`MAX_STOPS`] strings or one longer than [`MAX_STOP_BYTES`] is an
    /// error naming the `stop` field.
    pub fn new(stops: &[String], max_piece: usize) -> Result<Self, SamplingError> {
        let error = |reason: String| SamplingError {
            field: "stop",
            reason,
        };
        if stops.len() > MAX_STOPS {
            return Err(error(format!(
                "at most {MAX_STOPS} strings, got {}",
                stops.len()
            )));
        }
        let mut kept = heapless::Vec::new();
        for s in stops.iter().filter(|s| !s.is_empty()) {
            let stop = Stop::try_from(s.as_str()).map_err(|_| {
                error(format!(
                    "each string at most {MAX_STOP_BYTES} bytes, got one of {}",
                    s.len()
                ))
            })?;
            // Cannot fail: there are at most MAX_STOPS.
            let _ = kept.push(stop);
        }
        let longest = kept.iter().map(|s| s.len()).max().unwrap_or(0);
        Ok(Self {
            stops: kept,
            longest,
            held: String::with_capacity(longest + max_piece),
            stopped: false,
        })
    }

    /// Feeds newly decoded text: passes the text now safe to emit (if any) to `emit`, and
    /// returns its result and whether a stop string was hit (text up to, not including, the
    /// earliest stop string is emitted; nothing after, and later pushes emit nothing).
    pub fn push<R>(&mut self, text: &str, emit: impl FnOnce(&str) -> R) -> (Option<R>, bool) {
        if self.stopped {
            return (None, true);
        }
        if self.stops.is_empty() {
            return ((!text.is_empty()).then(|| emit(text)), false);
        }
        self.held.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            self.stopped = true;
            let out = (at > 0).then(|| emit(&self.held[..at]));
            self.held.clear();
            return (out, true);
        }
        let safe = self.held.len() - self.partial_stop_len();
        let out = (safe > 0).then(|| emit(&self.held[..safe]));
        self.held.drain(..safe);
        (out, false)
    }

    /// End of generation without a stop: passes the held-back remainder (if any) to `emit`.
    pub fn finish(&mut self, emit: impl FnOnce(&str)) {
        if !self.held.is_empty() {
            emit(&self.held);
            self.held.clear();
        }
    }

    /// Length in bytes of the longest suffix of `held` that starts a stop string; it always
    /// starts on a char boundary, so splitting there keeps both halves valid UTF-8.
    fn partial_stop_len(&self) -> usize {
        let held = self.held.as_bytes();
        let most = self.longest.saturating_sub(1).min(held.len());
        (1..=most)
            .rev()
            .find(|&n| {
                let tail = &held[held.len() - n..];
                self.held.is_char_boundary(held.len() - n)
                    && self.stops.iter().any(|s| s.as_bytes().starts_with(tail))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Default settings with seed 7, edited.
    fn params(edit: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            seed: Some(7),
            ..Default::default()
        };
        edit(&mut p);
        p
    }

    fn sampler(temperature: f32, seed: u64) -> Sampler {
        let seed = Some(seed);
        Sampler::new(SamplingParams {
            temperature,
            seed,
            ..Default::default()
        })
        .unwrap()
    }

    fn counts(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<usize> {
        let mut c = vec![0; logits.len()];
        for _ in 0..n {
            c[s.sample(logits, &[]) as usize] += 1;
        }
        c
    }

    /// Token ids drawn at least once in 2,000 draws (every kept token here has p >= 0.1).
    fn support(params: SamplingParams, logits: &[f32]) -> BTreeSet<usize> {
        let c = counts(&mut Sampler::new(params).unwrap(), logits, 2000);
        (0..c.len()).filter(|&i| c[i] > 0).collect()
    }

    /// Probabilities 0.15 / 0.5 / 0.05 / 0.3 for ids 0..4 (the nucleus order is 1, 3, 0, 2).
    fn nucleus_logits() -> Vec<f32> {
        [0.15f32, 0.5, 0.05, 0.3].iter().map(|p| p.ln()).collect()
    }

    #[test]
    fn greedy_picks_argmax_lowest_id_on_ties_whatever_the_seed() {
        let logits = [0.5, 3.0, f32::NAN, 3.0, -1.0];
        for seed in 0..20 {
            assert_eq!(sampler(0.0, seed).sample(&logits, &[]), 1);
        }
        assert_eq!(sampler(0.0, 1).sample(&[0.1, 0.2, 0.9], &[]), 2);
    }

    #[test]
    fn same_seed_repeats_the_sequence_and_different_seeds_do_not() {
        let logits: Vec<f32> = (0..32).map(|i| (i % 5) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = sampler(1.0, seed);
            (0..1000)
                .map(|_| s.sample(&logits, &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
        // Pinned: a change here changes every seeded request's output (PRNG or draw order).
        assert_eq!(run(42)[..12], PINNED_SEED_42);
    }
    const PINNED_SEED_42: [u32; 12] = [3, 12, 22, 29, 31, 24, 23, 27, 24, 18, 22, 9];

    #[test]
    fn prng_matches_the_reference_xoshiro256starstar_and_splitmix64() {
        // Vectors from the reference C code (as in rand_xoshiro's tests): state [1, 2, 3, 4].
        let mut rng = Rng { s: [1, 2, 3, 4] };
        let first: Vec<u64> = (0..4).map(|_| rng.next_u64()).collect();
        assert_eq!(first, [11520, 0, 1509978240, 1215971899390074240]);
        // splitmix64's first output for seed 0 is 0xE220A8397B1DCDAF.
        assert_eq!(Rng::new(0).s[0], 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn frequencies_match_softmax_within_chi_square_bound() {
        let logits = [1.0f32, 2.0, 0.5, 3.0, -1.0];
        let n = 20_000;
        let c = counts(&mut sampler(1.0, 2024), &logits, n);
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        let chi2: f64 = (0..logits.len())
            .map(|i| {
                let expected = n as f64 * f64::from(logits[i]).exp() / z; // >= 228 per cell
                (c[i] as f64 - expected).powi(2) / expected
            })
            .sum();
        // 5 categories => 4 degrees of freedom; 18.47 is the 99.9% quantile, so a correct sampler
        // fails for 1 seed in 1000 (this one is fixed), while a wrong distribution, e.g. an
        // off-by-one in the cumulative walk, scores in the hundreds.
        assert!(chi2 < 18.47, "chi2 = {chi2}, counts {c:?}");
    }

    #[test]
    fn low_temperature_sharpens_and_high_temperature_flattens() {
        let logits = [1.0f32, 2.0, 0.5, 3.0, -1.0];
        // P(argmax) is 0.86 at T=0.5, 0.62 at T=1, 0.42 at T=2.
        let top = |t| counts(&mut sampler(t, 5), &logits, 5000)[3] as f64 / 5000.0;
        let (sharp, plain, flat) = (top(0.5), top(1.0), top(2.0));
        assert!(
            sharp > 0.82 && (0.58..0.66).contains(&plain) && flat < 0.46,
            "{sharp} {plain} {flat}"
        );
    }

    #[test]
    fn top_k_never_samples_outside_the_top_k() {
        let logits = [1.0, 2.5, 0.0, 2.0, 1.9];
        assert_eq!(
            support(params(|p| p.top_k = 2), &logits),
            BTreeSet::from([1, 3])
        );
    }

    #[test]
    fn top_p_keeps_exactly_the_nucleus() {
        let with = |top_p| support(params(|p| p.top_p = top_p), &nucleus_logits());
        assert_eq!(with(0.5), BTreeSet::from([1]));
        assert_eq!(with(0.8), BTreeSet::from([1, 3]));
        assert_eq!(with(0.95), BTreeSet::from([0, 1, 3]));
        assert_eq!(with(0.96), BTreeSet::from([0, 1, 2, 3]));
    }

    #[test]
    fn min_p_drops_tokens_below_a_fraction_of_the_most_likely() {
        let with = |min_p| support(params(|p| p.min_p = min_p), &nucleus_logits());
        assert_eq!(with(0.2), BTreeSet::from([0, 1, 3])); // floor 0.1 drops 0.05
        assert_eq!(with(0.5), BTreeSet::from([1, 3])); // floor 0.25 drops 0.15
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits_once() {
        let mut s = Sampler::new(params(|p| p.repetition_penalty = 2.0)).unwrap();
        // Id 0 repeats but is penalized once; 7 is past the vocab and ignored.
        s.penalize(&[2.0, -1.0, 0.5, 1.0], &[0, 1, 0, 3, 7]);
        assert_eq!(s.logits, [1.0, -2.0, 0.5, 0.5]);
        s.penalize(&[2.0, -1.0, 0.5, 1.0], &[0, 1, 0, 3, 7]);
        assert_eq!(s.logits, [1.0, -2.0, 0.5, 0.5], "marks leaked");

        // Greedy applies it first: token 0 drops below token 1.
        let greedy = params(|p| (p.temperature, p.repetition_penalty) = (0.0, 2.0));
        assert_eq!(Sampler::new(greedy).unwrap().sample(&[2.0, 1.5], &[0]), 1);

        // Sampling sees it: -0.5 becomes -1.5, so P(token 0) falls from 0.5 to 0.27.
        let mut s = Sampler::new(params(|p| p.repetition_penalty = 3.0)).unwrap();
        let hits = (0..2000)
            .filter(|_| s.sample(&[-0.5, -0.5], &[0]) == 0)
            .count();
        assert!(
            (440..640).contains(&hits),
            "{hits} of 2000 draws picked the penalized token"
        );
    }

    #[test]
    fn validate_names_each_bad_field() {
        type Edit = fn(&mut SamplingParams);
        let cases: [(Edit, &str); 9] = [
            (|p| p.temperature = -0.1, "temperature"),
            (|p| p.temperature = f32::NAN, "temperature"),
            (|p| p.temperature = 1000.0, "temperature"),
            (|p| p.top_p = 0.0, "top_p"),
            (|p| p.top_p = 1.5, "top_p"),
            (|p| p.min_p = 1.0, "min_p"),
            (|p| p.min_p = -0.1, "min_p"),
            (|p| p.repetition_penalty = 0.0, "repetition_penalty"),
            (|p| p.repetition_penalty = f32::NAN, "repetition_penalty"),
        ];
        for (edit, field) in cases {
            let err = Sampler::new(params(edit)).unwrap_err();
            assert_eq!(err.field, field, "{err}");
            assert!(err.to_string().starts_with(field), "{err}");
        }
        assert_eq!(SamplingParams::default().validate(), Ok(()));
    }

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>(), 16).unwrap()
    }

    /// What a push emits (as one string) and whether it hit a stop.
    fn push(m: &mut StopMatcher, text: &str) -> (String, bool) {
        let (emitted, hit) = m.push(text, str::to_owned);
        (emitted.unwrap_or_default(), hit)
    }

    fn finish(m: &mut StopMatcher) -> String {
        let mut rest = String::new();
        m.finish(|t| rest.push_str(t));
        rest
    }

    /// The heap finds the same k-th largest as a full selection, ties and -inf included.
    #[test]
    fn the_top_k_heap_agrees_with_selection() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for n in [2usize, 50, 300, 5000] {
            let values: Vec<f64> = (0..n)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    match i % 11 {
                        0 => f64::NEG_INFINITY,
                        1 => 1.5, // ties
                        _ => (x % 1000) as f64 / 37.0 - 10.0,
                    }
                })
                .collect();
            for k in (1..n.min(HEAP_TOP_K + 1)).step_by(7) {
                let mut sorted = values.clone();
                let (_, &mut want, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
                assert_eq!(kth_largest(values.iter().copied(), k), want, "n {n}, k {k}");
            }
        }
    }

    #[test]
    fn too_many_or_too_long_stops_are_refused() {
        let many = vec!["x".to_string(); MAX_STOPS + 1];
        let err = StopMatcher::new(&many, 16).unwrap_err();
        assert_eq!(err.field, "stop");
        assert!(err.reason.contains("at most 16"), "{err}");
        let long = vec!["y".repeat(MAX_STOP_BYTES + 1)];
        assert!(
            StopMatcher::new(&long, 16)
                .unwrap_err()
                .reason
                .contains("257")
        );
        assert!(StopMatcher::new(&["y".repeat(MAX_STOP_BYTES)], 16).is_ok());
    }

    fn out(text: &str, stopped: bool) -> (String, bool) {
        (text.to_string(), stopped)
    }

    #[test]
    fn stop_inside_one_push_cuts_before_it_and_ends_the_stream() {
        let mut m = matcher(&["</s>"]);
        assert_eq!(push(&mut m, "hello</s>world"), out("hello", true));
        assert_eq!(push(&mut m, "more"), out("", true));
        assert_eq!(finish(&mut m), "");
    }

    #[test]
    fn stop_across_pushes_is_held_back_then_dropped() {
        let mut m = matcher(&["</s>"]);
        assert_eq!(push(&mut m, "hel"), out("hel", false));
        assert_eq!(push(&mut m, "lo<"), out("lo", false));
        assert_eq!(push(&mut m, "/"), out("", false));
        assert_eq!(push(&mut m, "s>x"), out("", true));
    }

    #[test]
    fn prefix_that_is_not_a_stop_is_released() {
        let mut m = matcher(&["</s>"]);
        assert_eq!(push(&mut m, "a<"), out("a", false));
        assert_eq!(push(&mut m, "/b"), out("</b", false));
    }

    #[test]
    fn multibyte_text_around_a_stop_never_splits_a_char() {
        let mut m = matcher(&["終わり"]);
        assert_eq!(push(&mut m, "こんにちは終"), out("こんにちは", false));
        assert_eq!(push(&mut m, "わ"), out("", false));
        assert_eq!(push(&mut m, "り！"), out("", true));
        // "è" shares its first byte with the stop's "é": it is not a prefix, so it goes out.
        let mut m = matcher(&["éa"]);
        assert_eq!(push(&mut m, "cafè"), out("cafè", false));
        assert_eq!(push(&mut m, "é"), out("", false));
        assert_eq!(push(&mut m, "b 🙂"), out("éb 🙂", false));
    }

    #[test]
    fn overlapping_stops_cut_at_the_earliest() {
        let mut m = matcher(&["ab", "b"]);
        assert_eq!(push(&mut m, "xa"), out("x", false));
        assert_eq!(push(&mut m, "b"), out("", true));
        assert_eq!(push(&mut matcher(&["ab", "b"]), "xb"), out("x", true));
        let mut m = matcher(&["abc", "bd"]);
        assert_eq!(push(&mut m, "ab"), out("", false));
        assert_eq!(push(&mut m, "d"), out("a", true));
    }

    #[test]
    fn finish_releases_held_text_and_no_stops_hold_nothing() {
        let mut m = matcher(&["</s>"]);
        assert_eq!(push(&mut m, "end<"), out("end", false));
        assert_eq!(finish(&mut m), "<");
        let mut m = matcher(&["", ""]);
        assert_eq!(push(&mut m, "a<"), out("a<", false));
        assert_eq!(finish(&mut m), "");
    }
}
