//! The text ↔ token-id boundary, built on the `tokenizers` crate from either a GGUF's metadata or
//! an HF `tokenizer.json`.
//!
//! A GGUF carries no `tokenizer.json`; it stores the vocabulary, merges, token types and special
//! ids under llama.cpp's keys, and names its pre-tokenizer (`tokenizer.ggml.pre`) instead of
//! spelling out the split regex. We rebuild the equivalent `tokenizers` pipeline and pick the
//! pre-tokenizer by that name exactly as llama.cpp does, refusing names we do not know: a wrong
//! split regex still produces valid-looking ids and silently degrades the model.
//!
//! Control tokens (type 3, e.g. `<|im_start|>`) and user-defined tokens (type 4) become added
//! tokens, so they are matched whole in the input text, like llama.cpp's `parse_special = true`
//! and like HF tokenizers always do.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::KvqError;
use crate::model_spec::gguf::{GgufFile, GgufValue};

/// Llama 3's split: digits in groups of up to three, case-insensitive contractions.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 2's split: like Llama 3's but single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// A tokenizer plus the facts about it the engine needs (special ids, chat template).
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    chat_template: Option<String>,
    origin: String,
}

fn model_err(origin: &str, reason: impl std::fmt::Display) -> KvqError {
    KvqError::Model {
        path: origin.to_string(),
        reason: reason.to_string(),
    }
}

impl Tokenizer {
    /// Reads the tokenizer of a GGUF file, an HF directory (its `tokenizer.json`), or a
    /// `tokenizer.json` file.
    pub fn from_path(path: &Path) -> Result<Self, KvqError> {
        if path.is_dir() {
            Self::from_tokenizer_json(&path.join("tokenizer.json"))
        } else if path.extension().is_some_and(|e| e == "json") {
            Self::from_tokenizer_json(path)
        } else {
            Self::from_gguf(&GgufFile::open(path)?, &path.display().to_string())
        }
    }

    /// Builds the tokenizer a GGUF's metadata describes. Only byte-level BPE
    /// (`tokenizer.ggml.model = "gpt2"`) is supported.
    pub fn from_gguf(f: &GgufFile, origin: &str) -> Result<Self, KvqError> {
        let err = |reason: String| model_err(origin, reason);
        let key_err = |key: &str| {
            err(format!(
                "metadata key `{key}` is missing or has the wrong type"
            ))
        };
        let strings = |key: &str| -> Result<Vec<&str>, KvqError> {
            let items = f
                .get(key)
                .and_then(GgufValue::as_array)
                .ok_or_else(|| key_err(key))?;
            items
                .iter()
                .map(|v| v.as_str().ok_or_else(|| key_err(key)))
                .collect()
        };
        let id = |key: &str| f.get(key).and_then(GgufValue::as_u64);
        let flag = |key: &str| matches!(f.get(key), Some(GgufValue::Bool(true)));

        let model = f.get("tokenizer.ggml.model").and_then(GgufValue::as_str);
        if model != Some("gpt2") {
            return Err(err(format!(
                "tokenizer.ggml.model is {model:?}; only \"gpt2\" (byte-level BPE) is supported"
            )));
        }
        let tokens = strings("tokenizer.ggml.tokens")?;
        let n = tokens.len();
        let types: Vec<i64> = match f.get("tokenizer.ggml.token_type") {
            None => vec![1; n],
            Some(v) => {
                let items = v
                    .as_array()
                    .ok_or_else(|| key_err("tokenizer.ggml.token_type"))?;
                let types = items
                    .iter()
                    .map(|t| match *t {
                        GgufValue::I32(x) => Some(x as i64),
                        _ => t.as_u64().map(|x| x as i64),
                    })
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| key_err("tokenizer.ggml.token_type"))?;
                if types.len() != n {
                    return Err(err(format!("{} token types for {n} tokens", types.len())));
                }
                types
            }
        };
        let merges = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        err(format!(
                            "merge `{m}` is not two tokens separated by a space"
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (bos_id, eos_id) = (
            id("tokenizer.ggml.bos_token_id"),
            id("tokenizer.ggml.eos_token_id"),
        );
        for (key, v) in [("bos", bos_id), ("eos", eos_id)] {
            if let Some(v) = v.filter(|&v| v >= n as u64) {
                return Err(err(format!(
                    "{key} token id {v} is outside the {n}-token vocabulary"
                )));
            }
        }
        // In range, so they fit in u32 (the vocabulary is indexed by u32 ids).
        let (bos_id, eos_id) = (bos_id.map(|v| v as u32), eos_id.map(|v| v as u32));

        // The BPE model maps each string to one id: a repeated token string keeps its first id.
        let mut vocab = Vocab::default();
        for (i, t) in tokens.iter().enumerate() {
            vocab.entry(t.to_string()).or_insert(i as u32);
        }
        let pre = f
            .get("tokenizer.ggml.pre")
            .and_then(GgufValue::as_str)
            .unwrap_or("default");
        let (pre_tokenizer, ignore_merges) = pre_tokenizer_for(pre).map_err(err)?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| err(format!("invalid BPE vocabulary or merges: {e}")))?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter_map(|(t, &ty)| match ty {
                TOKEN_TYPE_CONTROL => Some(AddedToken::from(t.to_string(), true).normalized(false)),
                TOKEN_TYPE_USER_DEFINED => {
                    Some(AddedToken::from(t.to_string(), false).normalized(false))
                }
                _ => None,
            })
            .collect();
        inner.add_special_tokens(&added);

        // BOS/EOS insertion on `encode(_, true)`. GGUF states it with add_bos/add_eos; a file
        // that does not say gets none, as HF's byte-level tokenizers do.
        let bos = bos_id.filter(|_| flag("tokenizer.ggml.add_bos_token"));
        let eos = eos_id.filter(|_| flag("tokenizer.ggml.add_eos_token"));
        let specials: Vec<(String, u32)> = bos
            .iter()
            .chain(&eos)
            .map(|&t| (tokens[t as usize].to_string(), t))
            .collect();
        let mut template: Vec<String> = bos
            .iter()
            .map(|&t| tokens[t as usize].to_string())
            .collect();
        template.push("$A".to_string());
        template.extend(eos.iter().map(|&t| tokens[t as usize].to_string()));
        if specials.is_empty() {
            inner.with_post_processor(Some(ByteLevel::default()));
        } else {
            let processor = TemplateProcessing::builder()
                .try_single(template)
                .and_then(|b| {
                    b.special_tokens(specials)
                        .build()
                        .map_err(|e| e.to_string())
                })
                .map_err(|e| err(format!("BOS/EOS template: {e}")))?;
            inner.with_post_processor(Some(processor));
        }

        Ok(Self {
            inner,
            bos_id,
            eos_id,
            chat_template: f
                .get("tokenizer.chat_template")
                .and_then(GgufValue::as_str)
                .map(str::to_string),
            origin: origin.to_string(),
        })
    }

    /// A stand-in for models without a tokenizer (random weights of a named shape): word
    /// `t{i}` is id `i`, words are split at whitespace, and there are no BOS, EOS or chat
    /// template. Benchmarks feed it token ids, so its only use is turning ids into text.
    pub fn synthetic(vocab_size: usize) -> Result<Self, KvqError> {
        let vocab: serde_json::Map<String, serde_json::Value> = (0..vocab_size)
            .map(|i| (format!("t{i}"), i.into()))
            .collect();
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
        });
        let origin = format!("synthetic tokenizer of {vocab_size} ids");
        let inner = json
            .to_string()
            .parse::<tokenizers::Tokenizer>()
            .map_err(|e| model_err(&origin, e))?;
        Ok(Self {
            inner,
            bos_id: None,
            eos_id: None,
            chat_template: None,
            origin,
        })
    }

    /// Reads an HF `tokenizer.json`. BOS/EOS and the chat template come from the
    /// `tokenizer_config.json` (and `chat_template.jinja`) beside it when they exist.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self, KvqError> {
        let origin = path.display().to_string();
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| model_err(&origin, e))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let config: serde_json::Value =
            match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
                Ok(text) => serde_json::from_str(&text).map_err(|e| {
                    model_err(&dir.join("tokenizer_config.json").display().to_string(), e)
                })?,
                Err(_) => serde_json::Value::Null,
            };
        // A special token is either "<s>" or {"content": "<s>", …}.
        let token_id = |key: &str| {
            let v = &config[key];
            v.as_str()
                .or_else(|| v["content"].as_str())
                .and_then(|t| inner.token_to_id(t))
        };
        let template = match &config["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            // Several named templates: take "default", else the first.
            serde_json::Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .or_else(|| list.first())
                .and_then(|t| t["template"].as_str())
                .map(str::to_string),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        Ok(Self {
            bos_id: token_id("bos_token"),
            eos_id: token_id("eos_token"),
            chat_template: template,
            inner,
            origin,
        })
    }

    /// Token ids of `text`. Special tokens written in the text are always recognised;
    /// `add_special` adds the BOS/EOS the model asks for (none for SmolLM2).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, KvqError> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| model_err(&self.origin, format!("tokenizer failed to encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens included (so a chat transcript round-trips).
    pub fn decode(&self, ids: &[u32]) -> Result<String, KvqError> {
        self.decode_with(ids, false)
    }

    /// The text of `ids`, optionally leaving out special tokens (for user-facing output).
    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String, KvqError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| model_err(&self.origin, format!("tokenizer failed to decode: {e}")))
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// The Jinja chat template the model ships, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The underlying `tokenizers` tokenizer (e.g. to save it as `tokenizer.json`).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// The pre-tokenizer for llama.cpp's `tokenizer.ggml.pre` name, and whether BPE skips merges for
/// words already in the vocabulary (llama.cpp does for Llama 3).
fn pre_tokenizer_for(pre: &str) -> Result<(PreTokenizerWrapper, bool), String> {
    let byte_level = |use_regex| ByteLevel::new(false, true, use_regex).into();
    let split = |regex: &str| -> Result<PreTokenizerWrapper, String> {
        let split = Split::new(
            SplitPattern::Regex(regex.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| format!("pre-tokenizer regex: {e}"))?;
        Ok(Sequence::new(vec![split.into(), byte_level(false)]).into())
    };
    Ok(match pre {
        // llama.cpp's `gpt-2` type: `ByteLevel(use_regex)` applies GPT-2's split,
        // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ .
        // Also our choice for files that name no pre-tokenizer.
        "default" | "gpt-2" | "gpt2" => (byte_level(true), false),
        // `\p{N}` first (every digit alone), then GPT-2's split: exactly HF's
        // `Sequence[Digits(individual_digits), ByteLevel]` these models ship.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => (
            Sequence::new(vec![Digits::new(true).into(), byte_level(true)]).into(),
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "smaug-bpe" => (split(LLAMA3_SPLIT)?, true),
        "qwen2" | "deepseek-r1-qwen" => (split(QWEN2_SPLIT)?, false),
        other => {
            return Err(format!(
                "tokenizer.ggml.pre `{other}` is not supported (known: default, gpt-2, smollm, starcoder, \
                 llama-bpe, qwen2 and their aliases)"
            ))
        }
    })
}

#[cfg(test)]
mod synthetic_tests {
    use super::*;

    #[test]
    fn the_synthetic_tokenizer_maps_words_to_ids() {
        let t = Tokenizer::synthetic(1000).unwrap();
        assert_eq!(t.vocab_size(), 1000);
        assert_eq!(t.encode("t5 t999", false).unwrap(), vec![5, 999]);
        assert_eq!(t.decode(&[5, 999]).unwrap(), "t5 t999");
        assert_eq!((t.bos_id(), t.eos_id()), (None, None));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model_spec::gguf::writer::header;

    fn strs(v: &[&str]) -> GgufValue {
        GgufValue::Array(v.iter().map(|s| GgufValue::String(s.to_string())).collect())
    }

    /// A tiny byte-level vocabulary: specials, the bytes it uses, and merges up to "Ġab".
    fn tiny(pre: &str, extra: Vec<(&'static str, GgufValue)>) -> GgufFile {
        let tokens = [
            "<|endoftext|>",
            "<|im_start|>",
            "a",
            "b",
            "Ġ",
            "1",
            "2",
            "!",
            "ab",
            "Ġab",
            "<think>",
        ];
        let types = [3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 4];
        let mut meta = vec![
            ("general.architecture", GgufValue::String("llama".into())),
            ("tokenizer.ggml.model", GgufValue::String("gpt2".into())),
            ("tokenizer.ggml.pre", GgufValue::String(pre.into())),
            ("tokenizer.ggml.tokens", strs(&tokens)),
            (
                "tokenizer.ggml.token_type",
                GgufValue::Array(types.iter().map(|&t| GgufValue::I32(t)).collect()),
            ),
            ("tokenizer.ggml.merges", strs(&["a b", "Ġ ab"])),
            ("tokenizer.ggml.bos_token_id", GgufValue::U32(1)),
            ("tokenizer.ggml.eos_token_id", GgufValue::U32(0)),
            (
                "tokenizer.chat_template",
                GgufValue::String("{{ x }}".into()),
            ),
        ];
        meta.extend(extra);
        GgufFile::from_bytes(&header(&meta, &[]), "tiny.gguf").unwrap()
    }

    #[test]
    fn byte_level_bpe_from_gguf_metadata() {
        let t = Tokenizer::from_gguf(&tiny("smollm", vec![]), "tiny.gguf").unwrap();
        assert_eq!(t.encode("ab ab", false).unwrap(), vec![8, 9]);
        assert_eq!(
            t.encode("<|im_start|>ab<|endoftext|>", false).unwrap(),
            vec![1, 8, 0]
        );
        assert_eq!(t.encode("a<think>b", false).unwrap(), vec![2, 10, 3]);
        assert_eq!(t.encode("12!", false).unwrap(), vec![5, 6, 7]);
        assert_eq!(
            t.decode(&[1, 8, 9, 0]).unwrap(),
            "<|im_start|>ab ab<|endoftext|>"
        );
        assert_eq!(t.decode_with(&[1, 8, 9, 0], true).unwrap(), "ab ab");
        assert_eq!((t.bos_id(), t.eos_id()), (Some(1), Some(0)));
        assert_eq!(t.chat_template(), Some("{{ x }}"));
        assert_eq!(t.vocab_size(), 11);
        // The file does not ask for BOS, so add_special adds nothing.
        assert_eq!(t.encode("ab", true).unwrap(), vec![8]);
    }

    #[test]
    fn add_bos_token_is_honoured() {
        let f = tiny(
            "gpt-2",
            vec![("tokenizer.ggml.add_bos_token", GgufValue::Bool(true))],
        );
        let t = Tokenizer::from_gguf(&f, "tiny.gguf").unwrap();
        assert_eq!(t.encode("ab", true).unwrap(), vec![1, 8]);
        assert_eq!(t.encode("ab", false).unwrap(), vec![8]);
    }

    #[test]
    fn every_known_pre_tokenizer_builds() {
        for pre in [
            "default",
            "gpt-2",
            "smollm",
            "starcoder",
            "llama-bpe",
            "llama3",
            "qwen2",
        ] {
            let t = Tokenizer::from_gguf(&tiny(pre, vec![]), "tiny.gguf").unwrap();
            assert_eq!(t.encode("ab ab!", false).unwrap(), vec![8, 9, 7], "{pre}");
        }
    }

    #[test]
    fn unsupported_or_broken_metadata_is_named() {
        let cases: Vec<(Vec<(&'static str, GgufValue)>, &str)> = vec![
            (
                vec![("tokenizer.ggml.pre", GgufValue::String("mystery".into()))],
                "`mystery` is not supported",
            ),
            (
                vec![("tokenizer.ggml.model", GgufValue::String("llama".into()))],
                "only \"gpt2\"",
            ),
            (vec![("tokenizer.ggml.merges", strs(&["ab"]))], "merge `ab`"),
            (
                vec![("tokenizer.ggml.merges", strs(&["x y"]))],
                "invalid BPE",
            ),
            (
                vec![("tokenizer.ggml.bos_token_id", GgufValue::U32(99))],
                "bos token id 99 is outside",
            ),
            (
                vec![(
                    "tokenizer.ggml.token_type",
                    GgufValue::Array(vec![GgufValue::I32(1)]),
                )],
                "1 token types",
            ),
            (
                vec![("tokenizer.ggml.tokens", GgufValue::U32(3))],
                "tokenizer.ggml.tokens",
            ),
        ];
        for (overrides, expected) in cases {
            let mut f = tiny("smollm", vec![]);
            for (k, v) in overrides {
                f.metadata.insert(k.to_string(), v);
            }
            let err = Tokenizer::from_gguf(&f, "tiny.gguf")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("tiny.gguf") && err.contains(expected),
                "{expected}: {err}"
            );
        }
    }

    #[test]
    fn tokenizer_json_round_trip_with_config() {
        let t = Tokenizer::from_gguf(&tiny("smollm", vec![]), "tiny.gguf").unwrap();
        let dir = std::env::temp_dir().join(format!("kvq-tokenizer-json-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        t.inner().save(dir.join("tokenizer.json"), false).unwrap();
        let config = r#"{"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|endoftext|>",
                         "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#;
        std::fs::write(dir.join("tokenizer_config.json"), config).unwrap();
        let j = Tokenizer::from_path(&dir);
        std::fs::write(dir.join("tokenizer.json"), "{ not json").unwrap();
        let broken = Tokenizer::from_path(&dir.join("tokenizer.json"))
            .unwrap_err()
            .to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        let j = j.unwrap();
        let text = "<|im_start|>ab ab<think>12!";
        assert_eq!(
            j.encode(text, false).unwrap(),
            t.encode(text, false).unwrap()
        );
        assert_eq!(
            (j.bos_id(), j.eos_id(), j.chat_template()),
            (Some(1), Some(0), Some("D"))
        );
        assert!(broken.contains("tokenizer.json"), "{broken}");
    }
}
