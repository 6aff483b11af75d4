//! The `--configs` list of `eval` and the benchmarks: `BACKEND:POLICY` entries
//! (`pytorch:42`) or `[cache]` entries (`pytorch:k=int4,v=lm2u,rotate` with an optional edge
//! override `first=N,last=N,ek=SIDE,ev=SIDE`), comma-separated.

use kvq::config::{EdgeLayers, QuantPolicy, SideKind};
use kvq::{EngineConfig, KvqError};

use super::args::apply_cache_flags;

/// The entries of `given` (`defaults` when empty) and the configs they name.
pub fn parse_configs(
    base: &EngineConfig,
    given: &[String],
    defaults: &[&str],
) -> Result<(Vec<String>, Vec<EngineConfig>), KvqError> {
    let specs: Vec<String> = if given.is_empty() {
        defaults.iter().map(|s| s.to_string()).collect()
    } else {
        split_configs(given)
    };
    let configs = specs
        .iter()
        .map(|s| parse_config(base, s))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((specs, configs))
}

/// Splits `--configs` values on commas; a piece without `:` (`v=int4`, `rotate`) continues
/// the entry before it.
fn split_configs(values: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for piece in values.iter().flat_map(|v| v.split(',')) {
        let piece = piece.trim();
        match out.last_mut() {
            Some(last) if !piece.contains(':') => {
                last.push(',');
                last.push_str(piece);
            }
            _ => out.push(piece.to_string()),
        }
    }
    out
}

fn parse_config(base: &EngineConfig, s: &str) -> Result<EngineConfig, KvqError> {
    let bad = |why: &str| {
        KvqError::InvalidArgument(format!(
            "--configs entry `{s}`: {why}; write BACKEND:POLICY or \
             BACKEND:k=SIDE,v=SIDE[,rotate][,first=N,last=N,ek=SIDE,ev=SIDE], either with an \
             optional ,window=N (engine.recent_window), ,tp=N (GPUs, engine.tp) and \
             ,prefix-caching (engine.enable_prefix_caching)"
        ))
    };
    let (backend, rest) = s.split_once(':').ok_or_else(|| bad("no `:`"))?;
    let mut c = base.clone();
    c.engine.backend = backend.to_string();
    c.cache = None;
    // `window=N`, `tp=N` and `prefix-caching` go with either form; the rest names the codec.
    let mut items = Vec::new();
    for item in rest.split(',') {
        let number = |n: &str, what: &str| {
            n.parse::<usize>()
                .map_err(|_| bad(&format!("`{n}` is not {what}")))
        };
        if let Some(n) = item.strip_prefix("window=") {
            c.engine.recent_window = number(n, "a token count")?;
        } else if let Some(n) = item.strip_prefix("tp=") {
            c.engine.tp = number(n, "a GPU count")?;
        } else if item == "prefix-caching" {
            c.engine.enable_prefix_caching = true;
        } else {
            items.push(item);
        }
    }
    let rest = items.join(",");
    let rest = rest.as_str();
    if rest.contains('=') || rest == "rotate" {
        let (mut k, mut v, mut rotate) = (None, None, false);
        let (mut edge_k, mut edge_v, mut first, mut last) = (None, None, 0, 0);
        let count = |n: &str| {
            n.parse::<usize>()
                .map_err(|_| bad(&format!("`{n}` is not a layer count")))
        };
        for item in rest.split(',') {
            match item.split_once('=') {
                Some(("k", side)) => k = Some(side),
                Some(("v", side)) => v = Some(side),
                Some(("ek", side)) => edge_k = Some(side),
                Some(("ev", side)) => edge_v = Some(side),
                Some(("first", n)) => first = count(n)?,
                Some(("last", n)) => last = count(n)?,
                None if item == "rotate" => rotate = true,
                _ => return Err(bad(&format!("unknown item `{item}`"))),
            }
        }
        c.engine.quant_policy = QuantPolicy::Number(0);
        apply_cache_flags(&mut c, k, v, rotate)?;
        match (edge_k, edge_v) {
            (Some(ek), Some(ev)) => {
                let side = |s: &str| SideKind::parse(s).map_err(|e| bad(&e));
                if let Some(cache) = c.cache.as_mut() {
                    cache.edge = Some(EdgeLayers {
                        first,
                        last,
                        k: side(ek)?,
                        v: side(ev)?,
                    });
                }
            }
            (None, None) if first + last == 0 => {}
            _ => return Err(bad("an edge override needs ek=, ev= and first= or last=")),
        }
    } else {
        c.engine.quant_policy = match rest.parse::<i64>() {
            Ok(n) => QuantPolicy::Number(n),
            Err(_) => QuantPolicy::Name(rest.to_string()),
        };
    }
    c.validate()?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_and_tp_go_with_either_form() {
        let base = EngineConfig::default();
        let list = ["pytorch:42,tp=2,pytorch:k=lm4,v=lm2u,window=16,tp=4".to_string()];
        let (names, got) = parse_configs(&base, &list, &[]).unwrap();
        assert_eq!(names.len(), 2);
        assert_eq!((got[0].engine.tp, got[0].engine.recent_window), (2, 0));
        assert_eq!((got[1].engine.tp, got[1].engine.recent_window), (4, 16));
        assert!(got[1].cache.is_some());
        let list = ["pytorch:8,prefix-caching,pytorch:k=int8,v=int8,prefix-caching".to_string()];
        let (_, got) = parse_configs(&base, &list, &[]).unwrap();
        assert!(got.iter().all(|c| c.engine.enable_prefix_caching));
        let err = parse_configs(&base, &["pytorch:8,tp=two".to_string()], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`two` is not a GPU count"), "{err}");
    }
}
