//! The pytorch backend's own rules on top of the shared ones: what policy 42 and int4 cannot
//! run, each with a message that says what to change.

use engine_core::config::{CodecChoice, SideKind};
use engine_core::ops::hadamard::is_power_of_two;
use engine_core::{AttentionKind, ConfigError, EngineConfig, ModelSpec};

/// The backend name used in error messages.
pub const BACKEND: &str = "pytorch";

fn unsupported(reason: String) -> ConfigError {
    ConfigError::Unsupported {
        backend: BACKEND.to_string(),
        reason,
    }
}

/// Model and option combinations policy 42 cannot run (reference §5.9).
pub fn check_turbo_quant_options(spec: &ModelSpec, cfg: &EngineConfig) -> Result<(), ConfigError> {
    if spec.attention == AttentionKind::Mla {
        return Err(unsupported(format!(
            "quant_policy 42 (TurboQuant) does not support MLA (multi-head latent attention) models \
             such as this `{}`: its Hadamard-domain K/V codec needs per-head K and V vectors; \
             use quant_policy 0 (none), 8 (int8) or 4 (int4) for this model",
            spec.architecture
        )));
    }
    if let Some(s) = &cfg.speculative {
        return Err(unsupported(format!(
            "quant_policy 42 (TurboQuant) does not support speculative decoding \
             ([speculative] method \"{}\", {} tokens): its decode path scores one query token \
             per sequence; remove the [speculative] section, or choose quant_policy 0, 8 or 4",
            s.method, s.num_speculative_tokens
        )));
    }
    Ok(())
}

/// Head dims a codec's packing or rotation cannot handle.
pub fn check_head_dims(choice: &CodecChoice, spec: &ModelSpec) -> Result<(), ConfigError> {
    let dims = [
        ("head_dim_k", spec.head_dim_k),
        ("head_dim_v", spec.head_dim_v),
    ];
    match choice {
        CodecChoice::TurboQuant => {
            for (name, d) in dims {
                if !is_power_of_two(d) || d < 4 {
                    return Err(unsupported(format!(
                        "quant_policy 42 (TurboQuant) needs head dims that are a power of two \
                         (at least 4) for its Hadamard rotation, but this model has {name} = {d}; \
                         use quant_policy 0, 8 or 4 for this model"
                    )));
                }
            }
        }
        CodecChoice::Int4 => {
            for (name, d) in dims {
                if d % 2 != 0 {
                    return Err(unsupported(format!(
                        "quant_policy 4 (int4) packs two 4-bit codes per byte and needs an even \
                         head dim, but this model has {name} = {d}; use quant_policy 8 or 0"
                    )));
                }
            }
        }
        CodecChoice::Sides(c) => {
            for (side, (name, d)) in [(c.k, dims[0]), (c.v, dims[1])] {
                check_side_dim(side, c.rotate, name, d)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// What one `[cache]` side needs of its head dim.
fn check_side_dim(side: SideKind, rotate: bool, name: &str, d: usize) -> Result<(), ConfigError> {
    let s = side.name();
    if side.needs_power_of_two(rotate) && (!is_power_of_two(d) || d < 8) {
        let why = if side.takes_rotate() {
            "with rotate = true it is stored in the Hadamard domain, which"
        } else {
            "it works in the Hadamard domain, which"
        };
        return Err(unsupported(format!(
            "[cache] side \"{s}\": {why} needs a power-of-two head dim of at least 8, but this \
             model has {name} = {d}; use \"int8\", \"int4\" or \"fp16\" without rotate"
        )));
    }
    if side == SideKind::Int4 && d % 2 != 0 {
        return Err(unsupported(format!(
            "[cache] side \"int4\" packs two 4-bit codes per byte and needs an even head dim, \
             but this model has {name} = {d}; use \"int8\" or \"fp16\""
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::PytorchBackend;
    use engine_core::config::{QuantPolicy, SpeculativeSection};
    use engine_core::{AttentionBackend, AttentionKind, ConfigError, EngineConfig, ModelSpec};

    fn cfg(policy: i64) -> EngineConfig {
        let mut c = EngineConfig::default();
        c.engine.quant_policy = QuantPolicy::Number(policy);
        c
    }

    fn spec_with(dk: usize, dv: usize) -> ModelSpec {
        ModelSpec {
            head_dim_k: dk,
            head_dim_v: dv,
            ..ModelSpec::smollm2_135m()
        }
    }

    fn mla_spec() -> ModelSpec {
        ModelSpec {
            architecture: "deepseek_v2".into(),
            attention: AttentionKind::Mla,
            head_dim_k: 192,
            head_dim_v: 128,
            ..ModelSpec::smollm2_135m()
        }
    }

    fn rejection(spec: &ModelSpec, cfg: &EngineConfig) -> String {
        match PytorchBackend.validate(spec, cfg) {
            Err(e @ ConfigError::Unsupported { .. }) => e.to_string(),
            other => panic!("expected an Unsupported error, got {other:?}"),
        }
    }

    fn assert_mentions(msg: &str, needles: &[&str]) {
        for n in needles {
            assert!(msg.contains(n), "message lacks {n:?}: {msg}");
        }
    }

    #[test]
    fn every_builtin_policy_validates_on_a_llama_shape() {
        for p in [0, 4, 8, 42] {
            PytorchBackend
                .validate(&ModelSpec::smollm2_135m(), &cfg(p))
                .unwrap();
        }
    }

    #[test]
    fn turbo_quant_rejects_mla_and_suggests_other_policies() {
        let msg = rejection(&mla_spec(), &cfg(42));
        assert_mentions(
            &msg,
            &[
                "pytorch backend",
                "MLA",
                "TurboQuant",
                "quant_policy 42",
                "0",
                "8",
                "4",
            ],
        );
        // The other policies run MLA-shaped models.
        for p in [0, 8, 4] {
            PytorchBackend.validate(&mla_spec(), &cfg(p)).unwrap();
        }
    }

    #[test]
    fn turbo_quant_rejects_speculative_decoding_and_says_how_to_fix() {
        let mut c = cfg(42);
        c.speculative = Some(SpeculativeSection {
            method: "ngram".into(),
            num_speculative_tokens: 4,
        });
        let msg = rejection(&ModelSpec::smollm2_135m(), &c);
        assert_mentions(
            &msg,
            &[
                "speculative decoding",
                "TurboQuant",
                "remove the [speculative] section",
                "quant_policy 0, 8 or 4",
            ],
        );
        c.engine.quant_policy = QuantPolicy::Number(8);
        PytorchBackend
            .validate(&ModelSpec::smollm2_135m(), &c)
            .unwrap();
    }

    #[test]
    fn turbo_quant_rejects_non_power_of_two_head_dims() {
        for (dk, dv, bad) in [
            (96, 96, "head_dim_k = 96"),
            (128, 80, "head_dim_v = 80"),
            (2, 2, "head_dim_k = 2"),
        ] {
            let msg = rejection(&spec_with(dk, dv), &cfg(42));
            assert_mentions(&msg, &["TurboQuant", "power of two", bad]);
            // int8 runs it.
            PytorchBackend
                .validate(&spec_with(dk, dv), &cfg(8))
                .unwrap();
        }
    }

    #[test]
    fn int4_rejects_odd_head_dims() {
        let msg = rejection(&spec_with(65, 64), &cfg(4));
        assert_mentions(
            &msg,
            &["int4", "even head dim", "head_dim_k = 65", "quant_policy 8"],
        );
        PytorchBackend
            .validate(&spec_with(96, 96), &cfg(4))
            .unwrap();
    }

    #[test]
    fn shared_rules_still_apply() {
        let mut c = cfg(8);
        c.engine.tp = 2;
        let msg = rejection(&ModelSpec::smollm2_135m(), &c);
        assert_mentions(&msg, &["tp = 2", "3 KV heads"]);
        // every rank needs whole KV heads and an equal MLP slice
        let spec = ModelSpec {
            num_kv_heads: 2,
            num_heads: 6,
            intermediate_size: 1538,
            ..ModelSpec::smollm2_135m()
        };
        c.engine.tp = 4;
        assert_mentions(&rejection(&spec, &c), &["tp = 4", "2 KV heads"]);
        c.engine.tp = 2;
        let odd_ff = ModelSpec {
            intermediate_size: 1537,
            ..spec
        };
        assert_mentions(&rejection(&odd_ff, &c), &["tp = 2", "1537 MLP rows"]);
    }
}
