//! What the tract backend's own operators share: reading the graph constants they bake in at
//! load, building their outputs, and the small vector loops.

use std::sync::{Arc, OnceLock};

use rayon::prelude::*;
use tract_onnx::tract_hir::internal::*;

/// The thread pool the backend's own operators run on (also tract's executor).
pub static POOL: OnceLock<Arc<rayon::ThreadPool>> = OnceLock::new();

/// Fills `y` through `f(first index, chunk)`, chunks of at least `min_chunk` values spread over
/// [`POOL`] (serially without one, or when `y` is short).
pub fn par_rows(y: &mut [f32], min_chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let threads = POOL.get().map_or(1, |p| p.current_num_threads());
    let chunk = y.len().div_ceil(threads * 4).max(min_chunk).max(1);
    match POOL.get() {
        Some(pool) if y.len() > chunk => pool.install(|| {
            y.par_chunks_mut(chunk)
                .enumerate()
                .for_each(|(i, c)| f(i * chunk, c))
        }),
        _ => f(0, y),
    }
}

/// A graph constant an operator bakes in when the graph is typed (weights, caches, sinks);
/// `what` names it in the error ("GroupQueryAttention: cos_cache").
pub fn konst(model: &TypedModel, outlet: OutletId, what: &str) -> TractResult<Arc<Tensor>> {
    model
        .outlet_fact(outlet)?
        .konst
        .clone()
        .with_context(|| format!("{what} must be a constant"))
}

/// [`konst`] as f32, cast when the graph stores it otherwise (f16 scales, say).
pub fn konst_f32(model: &TypedModel, outlet: OutletId, what: &str) -> TractResult<Arc<Tensor>> {
    let t = konst(model, outlet, what)?;
    Ok(if t.datum_type() == f32::datum_type() {
        t
    } else {
        Arc::new(t.cast_to::<f32>()?.into_owned())
    })
}

/// [`konst_f32`]'s values, for loops that index them directly.
pub fn konst_f32_vec(model: &TypedModel, outlet: OutletId, what: &str) -> TractResult<Vec<f32>> {
    let t = konst_f32(model, outlet, what)?;
    Ok(t.try_as_plain_ram()?.as_slice::<f32>()?.to_vec())
}

/// An f32 operator output of `shape`.
pub fn output(shape: &[usize], data: Vec<f32>) -> TractResult<TValue> {
    Ok(tract_ndarray::ArrayD::from_shape_vec(shape, data)?
        .into_tensor()
        .into())
}

/// Dot product with eight independent accumulators (vectorizes without fast-math).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

/// `y += a * x`.
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}
