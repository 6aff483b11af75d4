//! Run-time compilation of CUDA C to PTX with NVRTC, with an in-process and an on-disk cache
//! keyed by a hash of (source, architecture, options), so a kernel compiles once per machine.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use crate::KernelError;

/// A CUDA C source to compile, with its extra NVRTC options (specialisation `-D` macros).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSource {
    pub name: String,
    pub code: String,
    pub options: Vec<String>,
}

impl KernelSource {
    pub fn new(name: impl Into<String>, code: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            code: code.into(),
            options: Vec::new(),
        }
    }
}

/// Stable key of one compilation.
pub fn cache_key(src: &KernelSource, arch: &str) -> String {
    // FNV-1a: stable across runs and Rust versions, unlike `DefaultHasher`'s contract.
    struct Fnv(u64);
    impl Hasher for Fnv {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 ^= *b as u64;
                self.0 = self.0.wrapping_mul(0x100000001b3);
            }
        }
    }
    let mut h = Fnv(0xcbf29ce484222325);
    src.code.hash(&mut h);
    src.options.hash(&mut h);
    arch.hash(&mut h);
    format!("{}-{}-{:016x}", src.name, arch, h.finish())
}

/// Directory of the on-disk PTX cache: `$KVQ_KERNEL_CACHE`, else `$XDG_CACHE_HOME/kvq/ptx`,
/// else `~/.cache/kvq/ptx`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("KVQ_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("kvq").join("ptx"))
}

fn memory_cache() -> &'static Mutex<HashMap<String, String>> {
    static CACHE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// PTX for `src` on `arch` (e.g. `"compute_90"`), from the caches or freshly compiled.
pub fn ptx_for(src: &KernelSource, arch: &'static str) -> Result<String, KernelError> {
    let key = cache_key(src, arch);
    if let Some(ptx) = memory_cache().lock().expect("cache lock").get(&key) {
        return Ok(ptx.clone());
    }
    let disk = cache_dir().map(|d| d.join(format!("{key}.ptx")));
    if let Some(ptx) = disk.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        memory_cache()
            .lock()
            .expect("cache lock")
            .insert(key, ptx.clone());
        return Ok(ptx);
    }
    let ptx = compile(src, arch)?;
    if let Some(path) = disk {
        // A cache that cannot be written only costs a recompile next time.
        let _ = path
            .parent()
            .map(std::fs::create_dir_all)
            .and_then(|r| r.ok())
            .map(|_| std::fs::write(&path, &ptx));
    }
    memory_cache()
        .lock()
        .expect("cache lock")
        .insert(key, ptx.clone());
    Ok(ptx)
}

/// Whether NVRTC can be loaded on this machine.
pub fn nvrtc_available() -> bool {
    #[cfg(feature = "cuda")]
    {
        // SAFETY: only tries to dlopen the library; no symbol is called.
        unsafe { cudarc::nvrtc::sys::is_culib_present() }
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// Compiles `src` for `arch` with NVRTC.
#[cfg(feature = "cuda")]
pub fn compile(src: &KernelSource, arch: &'static str) -> Result<String, KernelError> {
    use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
    if !nvrtc_available() {
        return Err(KernelError::LibraryMissing("libnvrtc"));
    }
    let mut options = vec!["--std=c++17".to_string()];
    options.extend(src.options.iter().cloned());
    let opts = CompileOptions {
        arch: Some(arch),
        name: Some(format!("{}.cu", src.name)),
        options,
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(&src.code, opts).map_err(|e| KernelError::Compile {
        name: src.name.to_string(),
        arch: arch.to_string(),
        log: format!("{e:?}"),
    })?;
    Ok(ptx.to_src())
}

/// Without the `cuda` feature nothing can be compiled.
#[cfg(not(feature = "cuda"))]
pub fn compile(_src: &KernelSource, _arch: &'static str) -> Result<String, KernelError> {
    Err(KernelError::NotBuilt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a() -> KernelSource {
        KernelSource::new("a", "extern \"C\" __global__ void a() {}")
    }

    #[test]
    fn cache_key_depends_on_source_options_and_arch() {
        let a = a();
        let b = KernelSource::new("a", "extern \"C\" __global__ void a() { }");
        let mut c = a.clone();
        c.options.push("-DX=1".into());
        assert_ne!(cache_key(&a, "compute_90"), cache_key(&a, "compute_80"));
        assert_ne!(cache_key(&a, "compute_90"), cache_key(&b, "compute_90"));
        assert_ne!(cache_key(&a, "compute_90"), cache_key(&c, "compute_90"));
        assert_eq!(cache_key(&a, "compute_90"), cache_key(&a, "compute_90"));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_cuda_compiling_is_a_typed_error() {
        assert!(matches!(
            compile(&a(), "compute_90"),
            Err(KernelError::NotBuilt)
        ));
        assert!(!nvrtc_available());
    }
}
