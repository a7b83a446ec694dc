//! RoPE cos/sin caches for GroupQueryAttention (`do_rotary=1`): `[positions, dim/2]` f32,
//! NeoX half-split layout, with every scaling variant baked in the way transformers'
//! `ROPE_INIT_FUNCTIONS` computes `inv_freq` and `attention_scaling` (the latter multiplies both
//! caches, as transformers multiplies cos and sin).

use std::f64::consts::PI;

use crate::spec::{Rope, RopeScaling};

/// Inverse frequencies for positions in `[0, original_max)` (or all positions when the scaling
/// does not depend on position) and the attention scaling factor.
fn inv_freq(rope: &Rope, factors: Option<&[f64]>) -> Vec<f64> {
    let dim = rope.dim as f64;
    (0..rope.dim / 2)
        .map(|i| {
            let base = rope.theta.powf((2 * i) as f64 / dim);
            let ext = factors.map_or(1.0, |f| f[i]);
            1.0 / (ext * base)
        })
        .collect()
}

fn scaled_inv_freq(rope: &Rope) -> (Vec<f64>, f64) {
    let plain = inv_freq(rope, None);
    match &rope.scaling {
        RopeScaling::None => (plain, 1.0),
        RopeScaling::Linear { factor } => (plain.iter().map(|f| f / factor).collect(), 1.0),
        RopeScaling::Factors(f) => (inv_freq(rope, Some(f)), 1.0),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max,
        } => {
            let low_wavelen = original_max / low_freq_factor;
            let high_wavelen = original_max / high_freq_factor;
            let scaled = plain
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * PI / f;
                    if wavelen > low_wavelen {
                        f / factor
                    } else if wavelen < high_wavelen {
                        f
                    } else {
                        let smooth = (original_max / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect();
            (scaled, 1.0)
        }
        RopeScaling::Yarn {
            factor,
            beta_fast,
            beta_slow,
            original_max,
            truncate,
            attention_factor,
        } => {
            let dim = rope.dim as f64;
            let correction_dim =
                |rot: f64| dim * (original_max / (rot * 2.0 * PI)).ln() / (2.0 * rope.theta.ln());
            let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
            if *truncate {
                low = low.floor();
                high = high.ceil();
            }
            let low = low.max(0.0);
            let mut high = high.min(dim - 1.0);
            if low == high {
                high += 0.001;
            }
            let scaled = plain
                .iter()
                .enumerate()
                .map(|(i, &extrapolation)| {
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolation_factor = 1.0 - ramp;
                    let interpolation = extrapolation / factor;
                    interpolation * (1.0 - extrapolation_factor)
                        + extrapolation * extrapolation_factor
                })
                .collect();
            (scaled, *attention_factor)
        }
        RopeScaling::LongRope {
            short_factor,
            attention_factor,
            ..
        } => (inv_freq(rope, Some(short_factor)), *attention_factor),
    }
}

/// `(cos_cache, sin_cache)`, each `[positions * dim/2]` row-major.
///
/// LongRoPE: positions below `original_max_position_embeddings` use the short factors and the
/// rest the long factors, so one cache serves both regimes (transformers switches the whole
/// sequence to the long factors once it grows past the original length; for prompts within it,
/// the common case on a device, both agree exactly).
pub fn caches(rope: &Rope, positions: usize) -> (Vec<f32>, Vec<f32>) {
    let (short, scale) = scaled_inv_freq(rope);
    let long = match &rope.scaling {
        RopeScaling::LongRope {
            long_factor,
            original_max,
            ..
        } => Some((inv_freq(rope, Some(long_factor)), *original_max)),
        _ => None,
    };
    let half = rope.dim / 2;
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for p in 0..positions {
        let freqs = match &long {
            Some((long, original_max)) if p >= *original_max => long,
            _ => &short,
        };
        for f in freqs {
            // transformers computes `position * inv_freq` in f32; do the same so that large
            // positions round identically.
            let angle = (p as f32 * *f as f32) as f64;
            cos.push((angle.cos() * scale) as f32);
            sin.push((angle.sin() * scale) as f32);
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rope(scaling: RopeScaling) -> Rope {
        Rope {
            theta: 10000.0,
            dim: 8,
            scaling,
        }
    }

    #[test]
    fn plain_rope_position_zero_is_identity_and_one_is_inv_freq() {
        let (cos, sin) = caches(&rope(RopeScaling::None), 2);
        assert!(cos[..4].iter().all(|&c| c == 1.0));
        assert!(sin[..4].iter().all(|&s| s == 0.0));
        // inv_freq[1] = 10000^(-2/8) = 0.1
        assert!((sin[5] - 0.1f32.sin()).abs() < 1e-7);
    }

    #[test]
    fn linear_scaling_divides_frequencies() {
        let (_, sin) = caches(&rope(RopeScaling::Linear { factor: 2.0 }), 2);
        assert!((sin[4] - 0.5f32.sin()).abs() < 1e-7);
    }

    #[test]
    fn yarn_attention_factor_scales_cos_and_sin() {
        let r = rope(RopeScaling::Yarn {
            factor: 32.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            original_max: 4096.0,
            truncate: false,
            attention_factor: 1.5,
        });
        let (cos, _) = caches(&r, 1);
        assert!(cos.iter().all(|&c| (c - 1.5).abs() < 1e-6));
    }
}
