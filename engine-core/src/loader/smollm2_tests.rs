//! Checks against the real SmolLM2-135M-Instruct GGUF (`scripts/fetch-model.sh` puts it in
//! `models/`). The expected token ids and weight values were produced by independent
//! implementations (llama.cpp's tokenizer, HF `tokenizers` fed by transformers' GGUF converter,
//! and gguf-py's dequantizers), so these tests pin our loader to the model's own behaviour, not to
//! itself. Without the file they skip with a message; CI fetches it first.

use std::path::PathBuf;

use super::{GgmlType, GgufTensors, Tokenizer};

fn model_path() -> Option<PathBuf> {
    crate::testing::default_model()
}

/// (text, ids) with ids from the reference tokenizers; SmolLM2 adds no BOS/EOS.
const CASES: &[(&str, &[u32])] = &[
    (
        "Hello, world! The year 2024 saw 3.14% growth \u{2014}   and then some.\n\nIt's   double-spaced;   isn't it?",
        &[
            19556, 28, 905, 17, 378, 713, 216, 34, 32, 34, 36, 3680, 216, 35, 30, 33, 36, 21, 2063, 1841, 256, 284,
            965, 634, 30, 198, 198, 1589, 506, 256, 5561, 29, 2401, 2568, 43, 256, 3247, 982, 357, 47,
        ],
    ),
    (
        "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n    println!(\"{:?}\", x);\n}\n",
        &[
            7853, 1085, 1000, 1662, 472, 1303, 1792, 42, 717, 1159, 44, 101, 35, 34, 46, 446, 365, 32, 950, 33, 32,
            595, 5123, 24, 108, 89, 108, 2056, 1672, 216, 34, 595, 19190, 35040, 472, 1628, 34115, 17, 45257, 42, 47,
            29394, 1792, 4258, 198, 109, 198,
        ],
    ),
    (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n",
        &[
            1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182,
            2, 198, 1, 4093, 198, 1780, 314, 216, 33, 34, 1232, 216, 35, 32, 47, 2, 198, 1, 520, 9531, 198,
        ],
    ),
    (
        "Caf\u{e9} na\u{ef}ve fa\u{e7}ade \u{2014} \u{6771}\u{4eac} \u{1F680} \u{fc}ber",
        &[51, 1939, 2756, 15486, 46494, 40852, 1841, 17097, 247, 126, 16736, 122, 15107, 244, 218, 5549, 137, 593],
    ),
    ("  leading spaces\ttab\n\n\ntrailing   ", &[216, 2899, 5600, 197, 15999, 1116, 198, 4861, 4966, 333]),
    (
        "I'M here; they'll GO. We've 100,000 items!",
        &[57, 23, 61, 1535, 43, 502, 3060, 21820, 30, 1046, 3543, 216, 33, 32, 32, 28, 32, 32, 32, 3723, 17],
    ),
];

fn check_cases(t: &Tokenizer) {
    for (text, expected) in CASES {
        assert_eq!(&t.encode(text, false).unwrap(), expected, "encode {text:?}");
        assert_eq!(
            &t.encode(text, true).unwrap(),
            expected,
            "SmolLM2 adds no BOS: {text:?}"
        );
        assert_eq!(&t.decode(expected).unwrap(), text, "decode {text:?}");
    }
}

#[test]
fn gguf_tokenizer_matches_reference_ids() {
    let Some(path) = model_path() else { return };
    let t = Tokenizer::from_path(&path).unwrap();
    check_cases(&t);
    assert_eq!(
        (t.bos_id(), t.eos_id(), t.vocab_size()),
        (Some(1), Some(2), 49152)
    );
    assert_eq!(t.token_to_id("<|im_end|>"), Some(2));
    let template = t.chat_template().unwrap();
    assert!(
        template.starts_with("{% for message in messages %}") && template.contains("<|im_start|>")
    );
}

#[test]
fn tokenizer_json_written_from_the_gguf_reads_back_the_same() {
    let Some(path) = model_path() else { return };
    let t = Tokenizer::from_path(&path).unwrap();
    let dir = std::env::temp_dir().join(format!("kvq-smollm2-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    t.inner().save(dir.join("tokenizer.json"), false).unwrap();
    let j = Tokenizer::from_path(&dir.join("tokenizer.json"));
    std::fs::remove_dir_all(&dir).unwrap();
    check_cases(&j.unwrap());
}

/// (tensor, type, dims, [(flat index, value)], sum, sum of |x|) from gguf-py's dequantizers.
type Expected = (
    &'static str,
    GgmlType,
    [u64; 2],
    &'static [(usize, f32)],
    f64,
    f64,
);
const WEIGHTS: &[Expected] = &[
    (
        "token_embd.weight",
        GgmlType::Q8_0,
        [576, 49152],
        &[
            (0, -0.106_544_495),
            (1, 0.032_978_058),
            (15, 0.020_294_19),
            (16, -0.007_610_321),
            (31, -0.200_405_12),
            (32, -0.093_486_786),
            (14_155_781, -0.240_776_06),
            (28_311_551, -0.041_702_27),
        ],
        -15353.044494,
        2802153.619806,
    ),
    (
        "blk.0.attn_q.weight",
        GgmlType::Q4_1,
        [576, 576],
        &[
            (0, -0.096_313_48),
            (1, 0.157_348_63),
            (15, 0.537_841_8),
            (16, -0.223_144_53),
            (17, 0.284_179_7),
            (31, -0.096_313_48),
            (32, -0.346_191_4),
            (165_893, -0.167_968_75),
            (331_775, -0.255_859_38),
        ],
        59.223221,
        63395.398727,
    ),
    (
        "blk.29.ffn_down.weight",
        GgmlType::Q4_1,
        [1536, 576],
        &[
            (0, -0.273_315_43),
            (16, 0.324_157_7),
            (32, 0.026_611_328),
            (884_735, 0.056_640_625),
        ],
        49.835709,
        126250.914352,
    ),
    (
        "output_norm.weight",
        GgmlType::F32,
        [576, 1],
        &[(0, 1.757_812_5), (17, -1.257_812_5), (575, 1.984_375)],
        1038.332031,
        1045.097656,
    ),
];

#[test]
fn weights_dequantize_like_gguf_py() {
    let Some(path) = model_path() else { return };
    let t = GgufTensors::open(&path).unwrap();
    let count = |ty| {
        t.names()
            .filter(|n| t.raw(n).unwrap().ggml_type == ty)
            .count()
    };
    assert_eq!(
        (
            count(GgmlType::Q4_1),
            count(GgmlType::F32),
            count(GgmlType::Q8_0)
        ),
        (210, 61, 1)
    );
    assert_eq!(t.names().count(), 272);
    assert!(
        !t.contains("output.weight"),
        "SmolLM2 ties the output head to token_embd"
    );

    for &(name, ty, dims, values, sum, abs_sum) in WEIGHTS {
        let raw = t.raw(name).unwrap();
        assert_eq!(raw.ggml_type, ty, "{name}");
        assert_eq!(raw.dims, &dims[..raw.dims.len()], "{name}");
        let x = raw.to_f32().unwrap();
        for &(i, v) in values {
            assert_eq!(x[i], v, "{name}[{i}]");
        }
        let s: f64 = x.iter().map(|&v| v as f64).sum();
        let a: f64 = x.iter().map(|&v| (v as f64).abs()).sum();
        assert!(
            (s - sum).abs() < 1e-3 && (a - abs_sum).abs() < 1e-6 * abs_sum,
            "{name}: sum {s}, |sum| {a}"
        );
    }

    // Every tensor dequantizes to finite values.
    for name in t.names() {
        let x = t.to_f32(name).unwrap();
        assert!(
            x.iter().all(|v| v.is_finite()),
            "{name} has a non-finite value"
        );
    }
}
