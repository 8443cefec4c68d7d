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

/// A memory size above 0: a number with a unit, `24GiB`, `20GB`, `512MiB`, `512MB`, `64KiB`, or
/// bytes without one; bytes out.
pub fn memory_size(s: &str) -> Result<f64, String> {
    let t = s.trim();
    // the unit is the trailing letters (a number may have an exponent: 2.4e10)
    let split = t.trim_end_matches(|c: char| c.is_ascii_alphabetic()).len();
    let (number, unit) = t.split_at(split);
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kib" => 1024.0,
        "kb" => 1e3,
        "mib" => (1u64 << 20) as f64,
        "mb" => 1e6,
        "gib" => (1u64 << 30) as f64,
        "gb" => 1e9,
        "tib" => (1u64 << 40) as f64,
        "tb" => 1e12,
        _ => return Err(format!("unknown unit {unit:?} in {s:?}; expected GiB, GB, MiB, MB, KiB, KB, TiB, TB or B")),
    };
    let x = finite(number.trim()).map_err(|e| format!("{e} (in {s:?}; expected a size such as 24GiB)"))?;
    if x <= 0.0 {
        return Err(format!("must be above 0, got {s}"));
    }
    Ok(x * scale)
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
