//! HTTP helpers the serving tests share: one request, and waiting for a
//! party's endpoint to serve a deployment.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use confide_bench::loadgen::request_once;
use confide_tests::Federation;
use serde_json::Value;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// One request; the status and the body as JSON (or as a string).
pub fn get(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (status, text) = rt().block_on(request_once(addr, method, path, body)).expect("http");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Polls `/healthz` until `service` answers with deployment `sequence`.
pub fn wait_for_sequence(fed: &Federation, addr: SocketAddr, service: &str, sequence: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, v) = get(addr, "GET", "/healthz", "");
        assert_eq!(status, 200, "{v}");
        if v["services"][service]["version"]["sequence"] == sequence {
            return v["services"][service].clone();
        }
        assert!(
            Instant::now() < deadline,
            "service {service} never reached deployment {sequence}: {v}\n{}",
            fed.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
