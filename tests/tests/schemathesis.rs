//! The API against its own OpenAPI document, by schemathesis (a property-
//! based API tester from PyPI, a client we did not write): no request makes
//! the server answer 5xx, and every answer fits the document's schema,
//! status codes, content types and headers. `./scripts/test` installs it;
//! without it this test fails (it never skips).

use std::process::Command;

use serde_json::json;
use strata_tests::serve::Server;
use strata_tests::*;

#[test]
fn the_api_keeps_to_its_openapi_document() {
    let env = Env::new();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/hello");
    assert!(Command::new("cp")
        .arg("-r")
        .arg(format!("{}/.", src.display()))
        .arg(env.work())
        .status()
        .unwrap()
        .success());
    let token = env
        .ci(["serve", "token", "create", "fuzz"])
        .success()
        .stdout_str()
        .trim()
        .to_owned();
    let server = Server::start(&env, &["."], &[]);
    // Something to find: one finished run.
    let ws = server.get("/api/v1/workspaces").json()[0]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = server.post(
        &format!("/api/v1/workspaces/{ws}/runs"),
        &json!({}),
        Some(&token),
    );
    assert_eq!(r.status, 202);
    server.wait_run(r.json()["id"].as_str().unwrap());

    let st = std::env::var("SCHEMATHESIS").unwrap_or_else(|_| "st".into());
    let out = Command::new(&st)
        .args(["run", &format!("{}/api/v1/openapi.json", server.url)])
        .args(["--url", &server.url])
        .args([
            "--checks",
            "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance,response_headers_conformance",
        ])
        // One worker: with two, hypothesis parses sources with `ast` on two
        // threads at once, and CPython 3.11's AST constructor keeps its
        // recursion depth per interpreter, so it fails at random with
        // "AST constructor recursion depth mismatch" (python/cpython#106905).
        .args(["--max-examples", "40", "--workers", "1", "--seed", "1"])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .env("NO_COLOR", "1")
        .current_dir(env.root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{st}` (schemathesis; `pip install schemathesis`): {e}"));
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{text}\nserver log:\n{}",
        server.log()
    );
    assert!(!server.log().contains("panicked"), "{}", server.log());
}
