//! Incremental detokenization: turns a growing list of ids into text pieces without ever
//! emitting half of a multi-byte character (byte-level BPE splits UTF-8 across tokens).

use crate::error::KvqError;
use crate::loader::Tokenizer;

/// Emits the text each new token adds.
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window re-decoded each time (a few tokens back, for context-dependent
    /// decoders such as leading-space handling).
    prefix: usize,
    /// End of what has been emitted.
    read: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `id`, returning newly complete text.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, KvqError> {
        self.ids.push(id);
        let before = tok.decode_with(&self.ids[self.prefix..self.read], true)?;
        let after = tok.decode_with(&self.ids[self.prefix..], true)?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') && after.starts_with(&before)
        {
            let piece = after[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back (e.g. an incomplete character at the very end).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String, KvqError> {
        let before = tok.decode_with(&self.ids[self.prefix..self.read], true)?;
        let after = tok.decode_with(&self.ids[self.prefix..], true)?;
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(after.get(before.len()..).unwrap_or("").to_string())
    }
}
