//! `ci serve` end to end (issue 11): a real server on 127.0.0.1 at a free
//! port, a real store, a real HTTP client. Runs through the API, inline
//! pipelines, the event streams (order, resumption, many clients), tokens,
//! bad input, triggers (git, webhooks, timers, watched directories), and a
//! server killed during a run.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use strata_tests::serve::{Server, Sse};
use strata_tests::*;

fn workspace(files: &[(&str, &str)]) -> Env {
    let env = Env::new();
    write(
        env.work(),
        "ci.toml",
        "name = \"app\"\n[build]\nexecutor = \"host\"\n",
    );
    for (rel, text) in files {
        write(env.work(), rel, text);
    }
    env
}

fn hello() -> Env {
    let env = Env::new();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/hello");
    let status = Command::new("cp")
        .arg("-r")
        .arg(format!("{}/.", src.display()))
        .arg(env.work())
        .status()
        .expect("cp");
    assert!(status.success());
    env
}

fn token(env: &Env, name: &str, read_only: bool) -> String {
    let mut args = vec!["serve", "token", "create", name];
    if read_only {
        args.push("--read-only");
    }
    env.ci(args).success().stdout_str().trim().to_owned()
}

fn start_run(server: &Server, ws: &str, body: Value, token: &str) -> String {
    let r = server.post(&format!("/api/v1/workspaces/{ws}/runs"), &body, Some(token));
    assert_eq!(r.status, 202, "start a run: {}\n{}", r.text(), server.log());
    r.json()["id"].as_str().unwrap().to_owned()
}

fn outputs(run: &Value) -> BTreeMap<String, String> {
    run["tasks"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v["output"].as_str().unwrap_or("").to_owned()))
        .collect()
}

/// Polls the run list until `f` holds (the server's own state, not a sleep
/// standing in for it); fails after `secs`.
fn wait_for(server: &Server, secs: u64, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let runs = server.get("/api/v1/runs?limit=500").json();
        if f(&runs) {
            return runs;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; runs: {runs:#}\nserver log:\n{}",
                server.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run_count(server: &Server) -> usize {
    server.get("/api/v1/runs?limit=500").json()["runs"]
        .as_array()
        .unwrap()
        .len()
}

#[test]
fn a_run_through_the_api_matches_ci_build() {
    let env = hello();
    let tok = token(&env, "ci", false);
    let server = Server::start(&env, &["."], &[]);
    let ws = server.get("/api/v1/workspaces").json();
    let name = ws[0]["name"].as_str().unwrap().to_owned();
    let id = start_run(&server, &name, json!({"targets": ["//..."]}), &tok);
    let run = server.wait_run(&id);
    assert_eq!(run["state"], "succeeded", "{run:#}");
    assert_eq!(run["trigger"]["kind"], "api");
    assert_eq!(
        run["trigger"]["by"], "ci",
        "the token's name, never the token"
    );
    assert_eq!(run["tasks"].as_object().unwrap().len(), 4);
    drop(server);

    // The same workspace built by `ci build` in a store of its own.
    let other = hello();
    let out = other.ci(["--json", "build", "//..."]).success();
    let summary: Value = out
        .lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v.get("summary").cloned())
        .unwrap();
    let local = other
        .ci(["--json", "run", "show", "latest"])
        .success()
        .json();
    assert_eq!(outputs(&run), outputs(&local), "same outputs, task by task");
    assert_eq!(summary["executed"], 4);
    let executed = run["tasks"]
        .as_object()
        .unwrap()
        .values()
        .filter(|t| t["attempts"].as_u64() > Some(0) && t["cached"] == false)
        .count();
    assert_eq!(executed, 4);

    // Served again: the store's second run is all cache hits, and the first is still there.
    let server = Server::start(&env, &["."], &[]);
    let again = start_run(&server, &name, json!({}), &tok);
    let run2 = server.wait_run(&again);
    assert!(
        run2["tasks"]
            .as_object()
            .unwrap()
            .values()
            .all(|t| t["cached"] == true),
        "{run2:#}"
    );
    assert_eq!(run_count(&server), 2);
    // What `ci explain` says, as data.
    let ex = server
        .get(&format!(
            "/api/v1/workspaces/{name}/explain/%2F%2F%3Agreeting"
        ))
        .json();
    assert_eq!(ex["label"], "//:greeting");
    assert!(is_digest(ex["key"].as_str().unwrap()));
    // The graph, with edges by kind.
    let g = server
        .get(&format!("/api/v1/workspaces/{name}/graph"))
        .json();
    let kinds: Vec<&str> = g["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"input") && kinds.contains(&"transform"),
        "{g:#}"
    );
}

#[test]
fn inline_pipelines_run_and_bad_ones_name_the_field() {
    let env = workspace(&[("BUILD.star", "task(name = \"x\", cmd = [\"true\"])\n")]);
    let tok = token(&env, "ci", false);
    let server = Server::start(&env, &["."], &[]);
    let pipeline = json!({
        "tasks": {
            "//:make": {"label": "//:make", "kind": {"run": {"cmd": {"script": "echo made > out.txt"}}}},
            "//:use": {"label": "//:use", "kind": {"run": {"cmd": {"script": "cp \"$CI_IN/m/out.txt\" got.txt"}}},
                       "deps": [{"mount": "m", "label": "//:make"}]}
        }
    });
    let r = server.post(
        "/api/v1/runs",
        &json!({"pipeline": pipeline, "targets": ["//:use"]}),
        Some(&tok),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let run = server.wait_run(r.json()["id"].as_str().unwrap());
    assert_eq!(run["state"], "succeeded", "{run:#}");
    let out = run["tasks"]["//:use"]["output"].as_str().unwrap();
    let file = server.get(&format!("/api/v1/layers/{out}/file/got.txt"));
    assert_eq!(file.text(), "made\n");

    // A typo in a field: 400 naming it; an unknown dep: 400 naming the label.
    let bad = json!({"tasks": {"//:a": {"label": "//:a", "kind": {"run": {"cmd": {"script": "true"}, "pur": true}}}}});
    let r = server.post("/api/v1/runs", &json!({"pipeline": bad}), Some(&tok));
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("pur"),
        "{}",
        r.text()
    );
    let bad = json!({"tasks": {"//:a": {"label": "//:a", "kind": {"run": {"cmd": {"script": "true"}}}, "deps": [{"mount": "x", "label": "//:nope"}]}}});
    let r = server.post("/api/v1/runs", &json!({"pipeline": bad}), Some(&tok));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "bad_request");
    assert!(r.text().contains("//:nope"), "{}", r.text());
    // The same gate, without running anything.
    let r = server.post("/api/v1/validate", &json!({"pipeline": bad}), None);
    assert_eq!(r.status, 400, "{}", r.text());
    let r = server.post("/api/v1/validate", &json!({"pipeline": pipeline}), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(run_count(&server), 1, "refused pipelines start nothing");
}

/// A pipeline of `n` independent tasks, each printing a line.
fn wide(n: usize) -> Env {
    workspace(&[(
        "BUILD.star",
        &format!("[task(name = \"t%d\" % i, script = \"echo line of task %d\" % i) for i in range({n})]\n"),
    )])
}

/// Checks that events are numbered 0, 1, 2… without gap or repeat, and end.
fn check_sequence(events: &[Sse], from: u64) {
    let mut want = from;
    for e in events {
        if e.name == "end" {
            continue;
        }
        assert_eq!(e.id, Some(want), "event {} out of order: {e:?}", want);
        want += 1;
    }
    assert_eq!(events.last().map(|e| e.name.as_str()), Some("end"));
}

#[test]
fn event_streams_lose_and_repeat_nothing() {
    let env = wide(200);
    let tok = token(&env, "ci", false);
    let server = Server::start(&env, &["."], &[]);
    let id = start_run(&server, "app", json!({}), &tok);

    // 50 clients follow the live run at once.
    let url = server.url.clone();
    let clients: Vec<_> = (0..50)
        .map(|_| {
            let (url, id) = (url.clone(), id.clone());
            std::thread::spawn(move || {
                let agent = strata_tests::serve::agent();
                let res = agent
                    .get(format!("{url}/api/v1/runs/{id}/events"))
                    .call()
                    .unwrap();
                let mut s =
                    strata_tests::serve::SseStream::new_for_tests(res.into_body().into_reader());
                let mut out = Vec::new();
                while let Some(e) = s.next() {
                    let end = e.name == "end";
                    out.push(e);
                    if end {
                        break;
                    }
                }
                out
            })
        })
        .collect();

    // One leaves half-way and comes back with Last-Event-ID.
    let mut first = Vec::new();
    let mut s = server.stream(&id, None);
    while let Some(e) = s.next() {
        let stop = e.id == Some(150);
        first.push(e);
        if stop {
            break;
        }
    }
    drop(s);
    let rest = server.events(&id, Some(150));
    let mut all = first.clone();
    all.extend(rest.clone());
    check_sequence(&all, 0);

    let full: Vec<Sse> = clients
        .into_iter()
        .map(|c| c.join().unwrap())
        .next_back()
        .unwrap();
    check_sequence(&full, 0);
    assert_eq!(full.len(), all.len(), "every client got every event");
    let finished = full.iter().filter(|e| e.name == "task_finished").count();
    assert_eq!(finished, 200);
    assert_eq!(
        full.iter().filter(|e| e.name == "task_log").count(),
        200,
        "every log line"
    );

    // A finished run replays from the store, also after a restart.
    let run = server.get(&format!("/api/v1/runs/{id}")).json();
    assert_eq!(run["state"], "succeeded");
    drop(server);
    let server = Server::start(&env, &["."], &[]);
    let replay = server.events(&id, None);
    check_sequence(&replay, 0);
    assert_eq!(replay.len(), full.len());
    let tail = server.events(&id, Some(199));
    check_sequence(&tail, 200);
    // Without log lines: the same states, the log lines' numbers skipped.
    let res = strata_tests::serve::agent()
        .get(format!("{}/api/v1/runs/{id}/events?logs=false", server.url))
        .call()
        .unwrap();
    let mut quiet = strata_tests::serve::SseStream::new_for_tests(res.into_body().into_reader());
    let mut states = 0;
    while let Some(e) = quiet.next() {
        assert_ne!(e.name, "task_log");
        if e.name == "end" {
            break;
        }
        states += 1;
    }
    assert_eq!(states, full.len() - 1 - 200);
    // Logs, after the restart, from the store.
    let log = server.get(&format!("/api/v1/runs/{id}/tasks/%2F%2F%3At7/log"));
    assert_eq!(log.text(), "line of task 7\n");
    assert_eq!(log.header("x-log-complete"), Some("true"));
}

#[test]
fn writes_need_a_write_token_and_refusals_change_nothing() {
    let env = hello();
    let write = token(&env, "writer", false);
    let read = token(&env, "reader", true);
    let server = Server::start(&env, &["."], &[]);
    let name = server.get("/api/v1/workspaces").json()[0]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let id = start_run(&server, &name, json!({}), &write);
    server.wait_run(&id);
    let before = env.ci(["store", "du", "--json"]).success().json();
    let runs_before = run_count(&server);
    let writes: Vec<(String, Value)> = vec![
        (format!("/api/v1/workspaces/{name}/runs"), json!({})),
        ("/api/v1/runs".into(), json!({"pipeline": {"tasks": {}}})),
        (format!("/api/v1/runs/{id}/cancel"), json!({})),
        (format!("/api/v1/runs/{id}/rerun"), json!({})),
    ];
    for (path, body) in &writes {
        let none = server.post(path, body, None);
        assert_eq!(none.status, 401, "{path} without a token: {}", none.text());
        let bad = server.post(path, body, Some("strata_0000"));
        assert_eq!(bad.status, 401, "{path} with a bad token");
        assert!(
            !bad.text().contains("strata_0000"),
            "a token never appears in an error"
        );
        let ro = server.post(path, body, Some(&read));
        assert_eq!(
            ro.status,
            403,
            "{path} with a read-only token: {}",
            ro.text()
        );
        assert_eq!(ro.json()["error"]["code"], "forbidden");
    }
    assert_eq!(run_count(&server), runs_before);
    assert_eq!(
        env.ci(["store", "du", "--json"]).success().json(),
        before,
        "the store is unchanged"
    );
    assert!(!server.log().contains(&write) && !server.log().contains(&read));

    // A revoked token stops working at once, on the running server.
    env.ci(["serve", "token", "revoke", "writer"]).success();
    let r = server.post(
        &format!("/api/v1/workspaces/{name}/runs"),
        &json!({}),
        Some(&write),
    );
    assert_eq!(r.status, 401);
    let ls = env.ci(["--json", "serve", "token", "ls"]).success().json();
    assert_eq!(ls.as_array().unwrap().len(), 1);
    drop(server);

    // `--auth all`: reads need a token too.
    let server = Server::start(&env, &["."], &["--auth", "all"]);
    assert_eq!(server.get("/api/v1/runs").status, 401);
    let ok = server.get_with(
        "/api/v1/runs",
        &[("Authorization", &format!("Bearer {read}"))],
    );
    assert_eq!(ok.status, 200);
    assert_eq!(server.get("/healthz").status, 200);
}

#[test]
fn bad_requests_are_json_4xx_never_5xx() {
    let env = hello();
    let tok = token(&env, "ci", false);
    let server = Server::start(&env, &["."], &[]);
    let name = server.get("/api/v1/workspaces").json()[0]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let id = start_run(&server, &name, json!({}), &tok);
    let run = server.wait_run(&id);
    let out = run["tasks"]["//:stamped"]["output"]
        .as_str()
        .unwrap()
        .to_owned();
    let cases: Vec<(String, u16)> = vec![
        (
            format!("/api/v1/layers/{out}/file/%2E%2E/%2E%2E/etc/passwd"),
            400,
        ),
        (format!("/api/v1/layers/{out}/file/share%00/hello.txt"), 400),
        (format!("/api/v1/layers/{out}/file/%2Fetc%2Fpasswd"), 400),
        (format!("/api/v1/layers/{out}/tree/nope"), 404),
        (format!("/api/v1/layers/{out}/file/share"), 400),
        ("/api/v1/layers/zz".into(), 404),
        ("/api/v1/layers/0000000000000000".into(), 404),
        ("/api/v1/runs/nope".into(), 404),
        ("/api/v1/workspaces/nope/graph".into(), 404),
        (format!("/api/v1/runs/{id}/tasks/%2F%2F%3Anope/log"), 404),
        (format!("/api/v1/runs/{id}/tasks/notalabel/log"), 400),
        ("/api/v1/runs?state=bogus".into(), 400),
        ("/api/v1/runs?limit=x".into(), 400),
        ("/api/v1/nothing".into(), 404),
    ];
    for (path, want) in cases {
        let r = server.get(&path);
        assert_eq!(r.status, want, "GET {path}: {}", r.text());
        assert!(
            r.json()["error"]["message"].is_string(),
            "GET {path}: {}",
            r.text()
        );
    }
    let posts: Vec<(String, Vec<u8>, &str, u16)> = vec![
        (
            format!("/api/v1/workspaces/{name}/runs"),
            b"{not json".to_vec(),
            "application/json",
            400,
        ),
        (
            format!("/api/v1/workspaces/{name}/runs"),
            br#"{"targets": ["//:nope"]}"#.to_vec(),
            "application/json",
            400,
        ),
        (
            format!("/api/v1/workspaces/{name}/runs"),
            br#"{"jobs": 0}"#.to_vec(),
            "application/json",
            400,
        ),
        (
            format!("/api/v1/workspaces/{name}/runs"),
            br#"{"targest": []}"#.to_vec(),
            "application/json",
            400,
        ),
        (
            format!("/api/v1/workspaces/{name}/runs"),
            b"{}".to_vec(),
            "text/plain",
            415,
        ),
        (
            format!("/api/v1/workspaces/{name}/runs"),
            vec![b' '; 2 << 20],
            "application/json",
            413,
        ),
        (
            format!("/api/v1/runs/{id}/cancel"),
            b"".to_vec(),
            "application/json",
            409,
        ),
    ];
    let auth = format!("Bearer {tok}");
    for (path, body, ct, want) in posts {
        let r = server.post_raw(
            &path,
            &body,
            &[("Content-Type", ct), ("Authorization", &auth)],
        );
        assert_eq!(r.status, want, "POST {path}: {}", r.text());
        assert!(r.json()["error"]["code"].is_string());
    }
    let f = server.get(&format!("/api/v1/layers/{out}/file/share/hello.txt"));
    assert_eq!(f.header("content-type"), Some("application/octet-stream"));
    assert_eq!(f.header("x-content-type-options"), Some("nosniff"));
    let part = server.get_with(
        &format!("/api/v1/layers/{out}/file/share/hello.txt"),
        &[("Range", "bytes=7-11")],
    );
    assert_eq!(part.status, 206);
    assert_eq!(part.text(), "WORLD");
    let none = server.get_with(
        &format!("/api/v1/layers/{out}/file/share/hello.txt"),
        &[("Range", "bytes=900-")],
    );
    assert_eq!(none.status, 416);
    // The archive imports into another store as the same layer.
    let arc = server.get(&format!("/api/v1/layers/{out}/archive"));
    assert_eq!(arc.status, 200);
    let other = Env::new();
    write(other.root(), "l.tar.zst", &arc.body);
    let imported = other
        .ci([
            "store",
            "import",
            other.root().join("l.tar.zst").to_str().unwrap(),
        ])
        .success()
        .digest();
    assert_eq!(imported, out);
    let metrics = server.get("/metrics").text();
    for m in [
        "strata_runs{state=\"succeeded\"} 1",
        "strata_tasks_executed",
        "strata_queue_length",
        "strata_sse_clients",
        "strata_http_request_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(m), "/metrics lacks {m}:\n{metrics}");
    }
}

fn git(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_new_commit_starts_one_run_of_the_cone() {
    let env = workspace(&[(
        "BUILD.star",
        r#"
git_source(name = "repo", url = "repo", ref = "main", poll = "1s")
task(name = "count", deps = [":repo"], script = "wc -l < $CI_IN/repo/file.txt > n")
task(name = "other", script = "echo unrelated")
"#,
    )]);
    let repo = env.path("repo");
    std::fs::create_dir(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    write(&repo, "file.txt", "one\n");
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-qm", "one"]);
    let server = Server::start(&env, &["."], &[]);
    // Nothing changes: nothing starts.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(run_count(&server), 0, "{}", server.log());
    write(&repo, "file.txt", "one\ntwo\n");
    git(&repo, &["commit", "-qam", "two"]);
    let runs = wait_for(&server, 30, "a run started by the commit", |r| {
        r["runs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["state"] == "succeeded")
    });
    let run = &runs["runs"][0];
    assert_eq!(run["trigger"]["kind"], "git");
    assert_eq!(run["trigger"]["source"], "//:repo");
    let rec = server
        .get(&format!("/api/v1/runs/{}", run["id"].as_str().unwrap()))
        .json();
    let tasks: Vec<&String> = rec["tasks"].as_object().unwrap().keys().collect();
    assert_eq!(tasks, ["//:count", "//:repo"], "the cone only");
    let out = rec["tasks"]["//:count"]["output"].as_str().unwrap();
    assert_eq!(
        server
            .get(&format!("/api/v1/layers/{out}/file/n"))
            .text()
            .trim(),
        "2"
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(run_count(&server), 1, "exactly one run per commit");
}

fn sign(secret: &str, body: &[u8]) -> String {
    // HMAC-SHA256 by the openssl command, a client we did not write.
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", secret, "-hex"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(body)?;
            c.wait_with_output()
        })
        .expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout);
    format!("sha256={}", text.trim().rsplit(' ').next().unwrap())
}

#[test]
fn a_signed_delivery_starts_a_run_that_reads_the_payload() {
    let env = workspace(&[(
        "BUILD.star",
        r#"
webhook(name = "push", secret_env = "HOOK_SECRET", kind = "github")
task(name = "read", deps = [":push"], script = "cat $CI_IN/push/payload.json > got.json; cat $CI_IN/push/event > event")
"#,
    )]);
    let server = Server::start_env(&env, &["."], &[], &[("HOOK_SECRET", "s3cret")]);
    let body = br#"{"ref": "refs/heads/main", "after": "abc"}"#;
    // Wrongly signed, unsigned: 401 and nothing starts.
    let wrong = server.post_raw(
        "/hooks/app/push",
        body,
        &[
            ("X-Hub-Signature-256", &sign("other", body)),
            ("X-GitHub-Event", "push"),
        ],
    );
    assert_eq!(wrong.status, 401, "{}", wrong.text());
    let unsigned = server.post_raw("/hooks/app/push", body, &[("X-GitHub-Event", "push")]);
    assert_eq!(unsigned.status, 401);
    assert_eq!(run_count(&server), 0);
    let ok = server.post_raw(
        "/hooks/app/push",
        body,
        &[
            ("X-Hub-Signature-256", &sign("s3cret", body)),
            ("X-GitHub-Event", "push"),
            ("X-GitHub-Delivery", "d-1"),
            ("Content-Type", "application/json"),
        ],
    );
    assert_eq!(ok.status, 202, "{}", ok.text());
    let run = server.wait_run(ok.json()["id"].as_str().unwrap());
    assert_eq!(run["state"], "succeeded", "{run:#}");
    assert_eq!(run["trigger"]["kind"], "webhook");
    assert_eq!(run["trigger"]["detail"], "d-1");
    let out = run["tasks"]["//:read"]["output"].as_str().unwrap();
    assert_eq!(
        server
            .get(&format!("/api/v1/layers/{out}/file/got.json"))
            .body,
        body
    );
    assert_eq!(
        server
            .get(&format!("/api/v1/layers/{out}/file/event"))
            .text(),
        "push"
    );
    assert_eq!(server.post_raw("/hooks/app/nope", body, &[]).status, 404);

    // Under plain `ci build` the webhook holds what `--payload` gives.
    drop(server);
    write(env.root(), "p.json", "{\"local\": 1}");
    env.ci([
        "build",
        "--payload",
        &format!("//:push={}", env.root().join("p.json").display()),
        "//:read",
    ])
    .success();
}

#[test]
fn a_timer_ticks_and_a_watched_directory_starts_one_run_per_edit() {
    let env = workspace(&[
        (
            "BUILD.star",
            r#"
timer(name = "tick", every = "1s")
task(name = "on_tick", deps = [":tick"], script = "cat $CI_IN/tick/tick.json > t")
local_source(name = "src", path = "src", watch = True)
task(name = "on_src", deps = [":src"], script = "cat $CI_IN/src/a.txt > a")
"#,
        ),
        ("src/a.txt", "one\n"),
    ]);
    let server = Server::start(&env, &["."], &[]);
    let runs = wait_for(&server, 30, "two timer runs", |r| {
        r["runs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["trigger"]["kind"] == "timer" && x["state"] == "succeeded")
            .count()
            >= 2
    });
    let tick = runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["trigger"]["kind"] == "timer")
        .unwrap();
    assert_eq!(tick["targets"], json!(["//:on_tick", "//:tick"]));
    let rec = server
        .get(&format!("/api/v1/runs/{}", tick["id"].as_str().unwrap()))
        .json();
    let out = rec["tasks"]["//:on_tick"]["output"].as_str().unwrap();
    let t: Value =
        serde_json::from_str(&server.get(&format!("/api/v1/layers/{out}/file/t")).text()).unwrap();
    assert!(t["unix"].as_i64().unwrap() > 1_700_000_000);

    write(env.work(), "src/a.txt", "two\n");
    let runs = wait_for(&server, 30, "a run started by the edit", |r| {
        r["runs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["trigger"]["kind"] == "watch" && x["state"] == "succeeded")
    });
    let watched: Vec<&Value> = runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["trigger"]["kind"] == "watch")
        .collect();
    assert_eq!(watched.len(), 1, "one run per edit: {runs:#}");
    let rec = server
        .get(&format!(
            "/api/v1/runs/{}",
            watched[0]["id"].as_str().unwrap()
        ))
        .json();
    let out = rec["tasks"]["//:on_src"]["output"].as_str().unwrap();
    assert_eq!(
        server.get(&format!("/api/v1/layers/{out}/file/a")).text(),
        "two\n"
    );
}

#[test]
fn a_killed_server_leaves_an_interrupted_run_that_a_rerun_finishes() {
    let env = Env::new();
    // `slow` goes on once something listens on this port (a sandboxed host
    // task sees no file of the test, but reaches the host's loopback with
    // `network = True`); nothing does until the rerun.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    write(
        env.work(),
        "ci.toml",
        "name = \"app\"\n[build]\nexecutor = \"host\"\n",
    );
    write(
        env.work(),
        "BUILD.star",
        format!(
            "task(name = \"fast\", script = \"echo fast > f\")\n\
             task(name = \"slow\", deps = [\":fast\"], network = True, script = \"while ! bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' 2>/dev/null; do sleep 0.1; done; echo done > s\")\n"
        ),
    );
    let tok = token(&env, "ci", false);
    let server = Server::start(&env, &["."], &[]);
    let id = start_run(&server, "app", json!({}), &tok);
    // Wait until `slow` runs (its start is an event).
    let mut s = server.stream(&id, None);
    while let Some(e) = s.next() {
        if e.name == "task_started" && e.json()["label"] == "//:slow" {
            break;
        }
    }
    drop(s);
    server.kill();
    let server = Server::start(&env, &["."], &[]);
    let run = server.get(&format!("/api/v1/runs/{id}")).json();
    assert_eq!(run["state"], "interrupted", "{run:#}");
    assert_eq!(
        run["tasks"]["//:fast"]["state"], "succeeded",
        "what ended before the kill is kept"
    );
    let replay = server.events(&id, None);
    assert_eq!(replay.last().unwrap().name, "end");
    assert!(replay
        .iter()
        .any(|e| e.name == "run_finished" && e.json()["state"] == "interrupted"));
    drop(server);
    env.ci(["store", "verify"]).success();

    // The rerun keeps `fast` and runs `slow`, which may now finish.
    let server = Server::start(&env, &["."], &[]);
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind the port");
    std::thread::spawn(move || for _ in listener.incoming() {});
    let r = server.post(&format!("/api/v1/runs/{id}/rerun"), &json!({}), Some(&tok));
    assert_eq!(r.status, 202, "{}", r.text());
    let rerun = server.wait_run(r.json()["id"].as_str().unwrap());
    assert_eq!(rerun["state"], "succeeded", "{rerun:#}\n{}", server.log());
    assert_eq!(rerun["tasks"]["//:fast"]["reused"], true);
    assert_eq!(rerun["rerun_of"], id.as_str());
    assert_eq!(rerun["trigger"]["kind"], "rerun");
}

#[test]
fn sigterm_cancels_running_runs_and_exits_zero() {
    let env = Env::new();
    let marker = env.root().join("marker");
    write(
        env.work(),
        "ci.toml",
        "name = \"app\"\n[build]\nexecutor = \"host\"\n",
    );
    // The marker names this test's task among every process on the machine.
    write(
        env.work(),
        "BUILD.star",
        format!(
            "task(name = \"sleepy\", script = \"sleep 60; echo {}\")\n",
            marker.display()
        ),
    );
    let tok = token(&env, "ci", false);
    let server = Server::start(&env, &["."], &[]);
    let id = start_run(&server, "app", json!({}), &tok);
    let mut s = server.stream(&id, None);
    while let Some(e) = s.next() {
        if e.name == "task_started" {
            break;
        }
    }
    drop(s);
    let started = Instant::now();
    assert_eq!(server.stop(), Some(0));
    assert!(started.elapsed() < Duration::from_secs(30));
    let run = env.ci(["--json", "run", "show", &id]).success().json();
    assert_eq!(run["state"], "cancelled");
    assert_eq!(run["tasks"]["//:sleepy"]["state"], "cancelled");
    let needle = marker.display().to_string();
    let left = || {
        let ps = Command::new("pgrep")
            .args(["-f", &needle])
            .output()
            .unwrap();
        !ps.stdout.is_empty()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while left() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!left(), "no task process is left");
}

#[test]
fn ci_through_the_server_says_what_ci_says_locally() {
    let env = workspace(&[
        ("BUILD.star", "local_source(name = \"src\", path = \"src\")\ntask(name = \"up\", deps = [\":src\"], script = \"tr a-z A-Z < $CI_IN/src/a.txt > A.txt; echo made it\")\n"),
        ("src/a.txt", "hello\n"),
    ]);
    let tok = token(&env, "ci", false);
    let server = Server::start(&env, &["."], &[]);
    let via = |args: &[&str]| {
        let mut cmd = env.command(args);
        cmd.env("CI_SERVER", &server.url).env("CI_TOKEN", &tok);
        env.output(cmd)
    };
    // A plain `ci build` finds the server that owns the store and goes through it.
    let plain = env.ci(["build", "//..."]).success();
    assert!(
        plain.stderr_str().contains("owns the store"),
        "{}",
        plain.stderr_str()
    );
    assert_eq!(
        plain.stderr_str().matches("owns the store").count(),
        1,
        "said once"
    );
    let remote = via(&["--json", "build", "//..."]).success();
    assert!(remote.stdout_str().contains("\"summary\""));
    // Reads: the same bytes through the API as from the store.
    let out = env.ci(["--json", "run", "show", "latest"]).success().json()["tasks"]["//:up"]
        ["output"]
        .as_str()
        .unwrap()
        .to_owned();
    for args in [
        vec!["runs"],
        vec!["--json", "runs"],
        vec!["run", "show", "latest"],
        vec!["--json", "run", "show", "latest"],
        vec!["logs", "latest", "//:up"],
        vec!["explain", "//:up"],
        vec!["store", "ls", "-r", &out],
        vec!["--json", "store", "ls", &out],
        vec!["store", "cat", &out, "A.txt"],
        vec!["store", "show", &out],
        vec!["store", "ls", "//:up"],
    ] {
        let local = env.ci(&args).success();
        let remote = via(&args).success();
        assert_eq!(
            remote.stdout_str(),
            local.stdout_str(),
            "`ci {}` through the server",
            args.join(" ")
        );
    }
    // Exit codes: a failing task is 1, a malformed BUILD.star 2, both ways.
    write(
        env.work(),
        "BUILD.star",
        "task(name = \"bad\", script = \"exit 7\")\n",
    );
    let local_fail = env.ci(["--server", "", "build"]).code();
    let remote_fail = via(&["build"]).code();
    assert_eq!(remote_fail, Some(1));
    assert_eq!(local_fail, Some(1));
    write(env.work(), "BUILD.star", "task(name = \"bad\", script = \n");
    let remote_bad = via(&["build"]);
    assert_eq!(remote_bad.code(), Some(2), "{}", remote_bad.stderr_str());
    assert!(
        remote_bad.stderr_str().contains("BUILD.star:"),
        "located: {}",
        remote_bad.stderr_str()
    );
    drop(server);
    assert_eq!(env.ci(["build"]).code(), Some(2));
}

#[test]
fn the_plan_predicts_what_the_build_then_does() {
    let env = hello();
    let tok = token(&env, "ci", false);
    let server = Server::start(&env, &["."], &[]);
    let name = server.get("/api/v1/workspaces").json()[0]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let plan = |server: &Server| {
        server
            .get(&format!("/api/v1/workspaces/{name}/plan?targets=//..."))
            .json()["tasks"]
            .clone()
    };
    let cached = |run: &Value| -> BTreeMap<String, bool> {
        run["tasks"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v["cached"] == true))
            .collect()
    };
    let predicted = |p: &Value| -> BTreeMap<String, bool> {
        p.as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v["will_cache"] == true))
            .collect()
    };
    let first = plan(&server);
    assert!(
        first
            .as_object()
            .unwrap()
            .values()
            .all(|p| p["will_cache"] == false),
        "{first:#}"
    );
    assert_eq!(
        first["//:greeting"]["reason"],
        "it has not run in this workspace before"
    );
    assert_eq!(
        first["//:stamped"]["reason"],
        "its input `//:greeting` will run first"
    );
    let run = server.wait_run(&start_run(&server, &name, json!({}), &tok));
    assert_eq!(predicted(&first), cached(&run));

    let second = plan(&server);
    assert!(
        second
            .as_object()
            .unwrap()
            .values()
            .all(|p| p["will_cache"] == true),
        "{second:#}"
    );
    let run = server.wait_run(&start_run(&server, &name, json!({}), &tok));
    assert_eq!(predicted(&second), cached(&run));

    write(env.work(), "src/name.txt", "strata\n");
    let third = plan(&server);
    assert_eq!(third["//:src"]["will_cache"], false);
    let why = third["//:greeting"]["reason"].as_str().unwrap();
    assert!(
        why.contains("src"),
        "the reason names the changed input: {why}"
    );
    assert_eq!(
        third["//:greeting"]["changed_paths"],
        json!(["M src/name.txt"]),
        "down to the files"
    );
    assert_eq!(third["//:src"]["changed_paths"], json!(["M name.txt"]));
    assert_eq!(
        third["//:stamped"]["reason"],
        "its input `//:greeting` will run first"
    );
    let run = server.wait_run(&start_run(&server, &name, json!({}), &tok));
    assert_eq!(run["state"], "failed", "the test task checks for WORLD");
    assert_eq!(predicted(&third), cached(&run));
}

#[test]
fn a_timer_added_to_build_star_starts_without_a_restart() {
    let env = workspace(&[("BUILD.star", "task(name = \"plain\", cmd = [\"true\"])\n")]);
    let server = Server::start(&env, &["."], &[]);
    write(
        env.work(),
        "BUILD.star",
        "task(name = \"plain\", cmd = [\"true\"])\ntimer(name = \"tick\", every = \"1s\")\ntask(name = \"on_tick\", deps = [\":tick\"], cmd = [\"true\"])\n",
    );
    let runs = wait_for(&server, 90, "a run of the new timer", |r| {
        r["runs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["trigger"]["source"] == "//:tick" && x["state"] == "succeeded")
    });
    let tick = runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["trigger"]["source"] == "//:tick")
        .unwrap();
    assert_eq!(tick["targets"], json!(["//:on_tick", "//:tick"]));
    // Removed again: no more ticks after the sources restart. (The first
    // edit may have been loaded before the sources first started, with no
    // restart to say so: count from here.)
    let restarts = server.log().matches("restarting them").count();
    write(
        env.work(),
        "BUILD.star",
        "task(name = \"plain\", cmd = [\"true\"])\n",
    );
    // Generous: under the whole suite on 2 cores the reload can lag.
    let deadline = Instant::now() + Duration::from_secs(90);
    while server.log().matches("restarting them").count() <= restarts {
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Whatever was queued before the restart ends (under load that can take
    // a while): wait until the count has stayed the same for 3 s, which a
    // timer ticking every second would never allow.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut settled, mut since) = (run_count(&server), Instant::now());
    while since.elapsed() < Duration::from_secs(3) {
        assert!(
            Instant::now() < deadline,
            "the removed timer ticks on: {} runs\n{}",
            settled,
            server.log()
        );
        std::thread::sleep(Duration::from_millis(200));
        let now = run_count(&server);
        if now != settled {
            (settled, since) = (now, Instant::now());
        }
    }
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(
        run_count(&server),
        settled,
        "the removed timer ticks no more"
    );
}
