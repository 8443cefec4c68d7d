//! Range-checked values for numeric flags: clap refuses an out-of-range value with an error naming
//! the flag and the range (exit 2), before any work starts.

/// A count of at least 1 (batch sizes, lengths, steps).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|_| format!("expected a whole number >= 1, got {s:?}"))?;
    if n == 0 {
        return Err("must be at least 1".into());
    }
    Ok(n)
}

fn finite(s: &str) -> Result<f64, String> {
    let x: f64 = s.parse().map_err(|_| format!("expected a number, got {s:?}"))?;
    if !x.is_finite() {
        return Err(format!("must be finite, got {s}"));
    }
    Ok(x)
}

/// A number >= 0 (temperatures, smoothing).
pub fn non_negative(s: &str) -> Result<f64, String> {
    let x = finite(s)?;
    if x < 0.0 {
        return Err(format!("must be >= 0, got {s}"));
    }
    Ok(x)
}

/// A number > 0 (beta).
pub fn positive(s: &str) -> Result<f64, String> {
    let x = finite(s)?;
    if x <= 0.0 {
        return Err(format!("must be > 0, got {s}"));
    }
    Ok(x)
}

/// A probability in (0, 1] (nucleus top_p).
pub fn top_p(s: &str) -> Result<f64, String> {
    let x = finite(s)?;
    if !(x > 0.0 && x <= 1.0) {
        return Err(format!("must be in (0, 1], got {s}"));
    }
    Ok(x)
}

/// A fraction in [0, 1] (LD-DPO alpha, gaps of normalised ratings).
pub fn unit(s: &str) -> Result<f64, String> {
    let x = finite(s)?;
    if !(0.0..=1.0).contains(&x) {
        return Err(format!("must be in [0, 1], got {s}"));
    }
    Ok(x)
}

/// A fraction in (0, 1) (test splits: both sides keep rows).
pub fn open_unit(s: &str) -> Result<f64, String> {
    let x = finite(s)?;
    if !(x > 0.0 && x < 1.0) {
        return Err(format!("must be in (0, 1), got {s}"));
    }
    Ok(x)
}
