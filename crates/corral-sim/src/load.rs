//! The load simulated guests put on their hosts: a curve of CPU demand per VM, chosen by name.

use std::str::FromStr;

/// How a VM's CPU demand moves over time, as a fraction of its vCPUs.
#[derive(Clone, Debug, PartialEq)]
pub enum Curve {
    Constant(f64),
    /// Between `low` and `high` and back every `period_s` seconds; each VM at its own phase.
    Sine {
        low: f64,
        high: f64,
        period_s: f64,
    },
}

impl Curve {
    /// The demand at `t` seconds for a VM whose phase is `phase` (0 to 1).
    pub fn at(&self, t: f64, phase: f64) -> f64 {
        match *self {
            Curve::Constant(f) => f,
            Curve::Sine {
                low,
                high,
                period_s,
            } => {
                let x = (t / period_s + phase) * std::f64::consts::TAU;
                low + (high - low) * (1.0 - x.cos()) / 2.0
            }
        }
    }
}

/// A load that does not parse: which, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BadLoad {
    Curve { curve: String, why: String },
    Entry(String),
}

impl std::fmt::Display for BadLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadLoad::Curve { curve, why } => write!(
                f,
                "bad load curve {curve:?}: {why}; write a fraction of the vCPUs (\"0.8\") or \"sine:LOW-HIGH/SECONDS\" (\"sine:0.1-0.9/600\")"
            ),
            BadLoad::Entry(entry) => write!(
                f,
                "bad load {entry:?}: write NAME-PREFIX=CURVE, e.g. \"web-=0.7\" (an empty prefix matches every VM)"
            ),
        }
    }
}

impl std::error::Error for BadLoad {}

/// `s` as a fraction from 0 to 1, or why not.
fn fraction(s: &str) -> Result<f64, BadLoad> {
    s.parse::<f64>()
        .ok()
        .filter(|f| (0.0..=1.0).contains(f))
        .ok_or_else(|| BadLoad::Curve {
            curve: s.to_string(),
            why: "not a fraction from 0 to 1".into(),
        })
}

impl FromStr for Curve {
    type Err = BadLoad;

    fn from_str(s: &str) -> Result<Self, BadLoad> {
        let bad = |why: String| BadLoad::Curve {
            curve: s.to_string(),
            why,
        };
        let Some(sine) = s.strip_prefix("sine:") else {
            return fraction(s).map(Curve::Constant);
        };
        let (range, period) = sine
            .split_once('/')
            .ok_or_else(|| bad("no period".into()))?;
        let (low, high) = range
            .split_once('-')
            .ok_or_else(|| bad("no range".into()))?;
        let period_s = period
            .parse::<f64>()
            .ok()
            .filter(|p| *p > 0.0)
            .ok_or_else(|| bad(format!("period {period:?} is not a positive number")))?;
        let (low, high) = (fraction(low)?, fraction(high)?);
        if low > high {
            return Err(bad("LOW is above HIGH".into()));
        }
        Ok(Curve::Sine {
            low,
            high,
            period_s,
        })
    }
}

/// Load curves by VM name prefix, the first that matches wins: `hot-=0.9,=sine:0.1-0.5/300`.
/// A VM no prefix matches idles at 5%; `none` turns usage reports off (DRS then counts what each
/// VM was given).
#[derive(Clone, Debug, PartialEq)]
pub struct Loads(Option<Vec<(String, Curve)>>);

impl Default for Loads {
    fn default() -> Self {
        Loads(Some(Vec::new()))
    }
}

impl FromStr for Loads {
    type Err = BadLoad;

    fn from_str(s: &str) -> Result<Self, BadLoad> {
        if s == "none" {
            return Ok(Loads(None));
        }
        s.split(',')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (prefix, curve) = p
                    .split_once('=')
                    .ok_or_else(|| BadLoad::Entry(p.to_string()))?;
                Ok((prefix.to_string(), curve.parse()?))
            })
            .collect::<Result<Vec<_>, BadLoad>>()
            .map(|v| Loads(Some(v)))
    }
}

impl Loads {
    pub(crate) fn of(&self, name: &str) -> Option<Curve> {
        let curves = self.0.as_ref()?;
        Some(
            curves
                .iter()
                .find(|(p, _)| name.starts_with(p.as_str()))
                .map_or(Curve::Constant(0.05), |(_, c)| c.clone()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_and_loads_parse_and_refuse_nonsense() {
        assert_eq!("0.8".parse::<Curve>(), Ok(Curve::Constant(0.8)));
        let sine: Curve = "sine:0.1-0.9/600".parse().unwrap();
        assert!((sine.at(0.0, 0.0) - 0.1).abs() < 1e-9);
        assert!((sine.at(300.0, 0.0) - 0.9).abs() < 1e-9);
        for bad in [
            "1.5",
            "x",
            "sine:0.9-0.1/60",
            "sine:0.1-0.9",
            "sine:0.1-0.9/0",
        ] {
            let e = bad.parse::<Curve>().unwrap_err();
            assert!(
                e.to_string().contains("sine:LOW-HIGH/SECONDS"),
                "{bad}: {e}"
            );
        }
        let loads: Loads = "hot-=1,=0.2".parse().unwrap();
        assert_eq!(loads.of("hot-1"), Some(Curve::Constant(1.0)));
        assert_eq!(loads.of("web"), Some(Curve::Constant(0.2)));
        assert_eq!(Loads::default().of("web"), Some(Curve::Constant(0.05)));
        assert_eq!("none".parse::<Loads>().unwrap().of("web"), None);
        assert!("hot"
            .parse::<Loads>()
            .unwrap_err()
            .to_string()
            .contains("NAME-PREFIX=CURVE"));
    }
}
