//! `kvq serve` as a process: it starts on a free loopback port, prints its cache plan and
//! address, answers over HTTP, and refuses bad arguments. (tests/server/ drives it with the
//! official openai client.)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The server process, killed when dropped.
struct Server {
    child: Child,
    port: u16,
    log: Vec<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn model() -> Option<String> {
    engine_core::testing::default_model().map(|p| p.display().to_string())
}

/// Starts `kvq serve ARGS --server-port 0` and waits (bounded) for its address line.
fn start(args: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvq"))
        .arg("serve")
        .args(args)
        .args(["--server-name", "127.0.0.1", "--server-port", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kvq serve");
    let stderr = child.stderr.take().expect("stderr");
    let mut server = Server {
        child,
        port: 0,
        log: Vec::new(),
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Bounded: the address comes within two minutes, or the process has ended.
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(120)) {
        server.log.push(line.clone());
        if let Some(rest) = line.split("http://127.0.0.1:").nth(1) {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            server.port = digits.parse().expect("port");
            return server;
        }
    }
    panic!("kvq serve did not start: {:?}", server.log);
}

/// One HTTP/1.1 request; returns (status, body).
fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("response");
    let status = resp[9..12].parse().expect("status");
    let body = resp
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

#[test]
fn serve_answers_on_a_free_port_and_prints_its_plan() {
    let Some(model) = model() else { return };
    let server = start(&[
        "api_server",
        &model,
        "--quant-policy",
        "8",
        "--cache-memory-gib",
        "0.02",
    ]);
    let plan = &server.log[0];
    assert!(
        plan.contains("blocks of 64 tokens") && plan.contains("x the fp16 cache"),
        "{plan}"
    );
    let (status, body) = http(server.port, "GET", "/health", "");
    assert_eq!(status, 200, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["free_blocks"], h["total_blocks"]);
    let (status, body) = http(server.port, "GET", "/v1/models", "");
    assert_eq!(status, 200);
    assert!(body.contains("\"SmolLM2-135M-Instruct.Q4_1\""), "{body}");
    let req = r#"{"model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": "Hi"}]}"#;
    let (status, body) = http(server.port, "POST", "/v1/chat/completions", req);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 4);
    let (status, body) = http(server.port, "POST", "/v1/chat/completions", "{");
    assert_eq!(status, 400);
    assert!(body.starts_with("{\"error\":"), "{body}");
}

#[test]
fn serve_refuses_two_models_and_stray_arguments() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvq"))
        .args(["serve", "a.gguf", "--model", "b.gguf"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not both"));
    let out = Command::new(env!("CARGO_BIN_EXE_kvq"))
        .args(["serve", "a.gguf", "b.gguf"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unexpected arguments"));
}
