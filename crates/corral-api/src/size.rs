use crate::ValidationError;

/// Parses a size such as "256M", "1G", "512MiB", "1.5G" or a plain number of bytes.
/// Units are binary (K = 1024), as QEMU and every hypervisor UI use them.
pub fn parse_size(what: &str, input: &str) -> Result<u64, ValidationError> {
    let bad = || {
        ValidationError::new(format!(
            "malformed {what} {input:?}: write a number with an optional unit K, M, G or T (binary units), e.g. 256M or 1G"
        ))
    };
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(bad());
    }
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(bad()),
    };
    let value: f64 = num.parse().map_err(|_| bad())?;
    let bytes = value * (1u64 << shift) as f64;
    // Well-formed, but no size Corral can use: a rule the API document does not state.
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 / 2.0 || bytes.fract() != 0.0 {
        return Err(ValidationError::unprocessable(format!(
            "{what} {input:?} is not a whole number of bytes Corral can use: e.g. 256M or 1G"
        )));
    }
    Ok(bytes as u64)
}

/// Formats bytes the way `parse_size` reads them back ("256M", "1.5G").
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("T", 40), ("G", 30), ("M", 20), ("K", 10)];
    for (unit, shift) in UNITS {
        let scale = 1u64 << shift;
        if bytes >= scale {
            let v = bytes as f64 / scale as f64;
            return if bytes.is_multiple_of(scale) {
                format!("{}{unit}", bytes / scale)
            } else {
                format!("{v:.1}{unit}")
            };
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("memory", "256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("memory", "256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size("disk", "1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("disk", "1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_size("disk", "4096").unwrap(), 4096);
    }

    #[test]
    fn a_size_written_right_but_unusable_is_unprocessable_not_malformed() {
        use crate::Refusal;
        assert_eq!(
            parse_size("memory", "12XB").unwrap_err().1,
            Refusal::Malformed
        );
        assert_eq!(
            parse_size("memory", "0.3B").unwrap_err().1,
            Refusal::Unprocessable
        );
        let huge = parse_size("disk", "99999999999T").unwrap_err();
        assert_eq!(huge.1, Refusal::Unprocessable, "{huge}");
    }

    #[test]
    fn rejects_malformed_with_a_hint() {
        for bad in ["12XB", "", "M", "-1G", "1..2G", "0.3B", "1e9"] {
            let err = parse_size("memory", bad).unwrap_err();
            assert!(err.0.contains("e.g. 256M"), "{bad}: {err}");
        }
    }

    proptest! {
        #[test]
        fn format_round_trips_whole_units(n in 1u64..1_000_000, shift in prop::sample::select(vec![0u32, 10, 20, 30])) {
            let bytes = n << shift;
            let text = format_bytes(bytes);
            if !text.contains('.') {
                prop_assert_eq!(parse_size("x", &text).unwrap(), bytes);
            }
        }
    }
}
