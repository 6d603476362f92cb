//! Durations as operators write them: `90s`, `15m`, `720h`, `30d`, or combined (`1d12h`).

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a duration (e.g. 90s, 15m, 720h, 30d): {reason}")]
pub struct DurationError {
    pub text: String,
    pub reason: &'static str,
}

/// Parses a positive duration made of number+unit parts, units `s`, `m`, `h`, `d`.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let err = |reason| DurationError {
        text: text.to_string(),
        reason,
    };
    let mut total: u64 = 0;
    let mut digits = String::new();
    if text.is_empty() {
        return Err(err("empty"));
    }
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: u64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(err("unknown unit")),
        };
        let n: u64 = digits.parse().map_err(|_| err("a unit without a number"))?;
        digits.clear();
        total = n
            .checked_mul(unit)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(|| err("too long"))?;
    }
    if !digits.is_empty() {
        return Err(err("a number without a unit"));
    }
    if total == 0 {
        return Err(err("must be longer than zero"));
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_operator_durations() {
        assert_eq!(parse("720h").unwrap().as_secs(), 720 * 3600);
        assert_eq!(parse("30d").unwrap().as_secs(), 30 * 86400);
        assert_eq!(parse("90s").unwrap().as_secs(), 90);
        assert_eq!(parse("1d12h").unwrap().as_secs(), 36 * 3600);
        for bad in ["", "10", "h", "5y", "0s", "99999999999999999999d", "-5s"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
