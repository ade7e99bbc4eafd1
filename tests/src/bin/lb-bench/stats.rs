//! Small statistics shared by the sections.

/// Median of integer samples (upper median for an even count). `v` must not be empty.
pub fn median(mut v: Vec<u64>) -> f64 {
    v.sort_unstable();
    v[v.len() / 2] as f64
}

/// Median of float samples (upper median for an even count). `v` must not be empty.
pub fn median_f(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
