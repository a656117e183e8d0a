//! `ci serve` as a Bazel / ccache cache, driven by the real clients: Bazel
//! (npm `@bazel/bazel-linux_x64`, installed by `./scripts/test` into
//! `~/.cache/strata-bazel`, or `$STRATA_BAZEL`) over HTTP and gRPC, ccache
//! over HTTP, the HTTP protocol's edge cases with ureq and the REAPI
//! services' with the tonic client of `bazel-remote-apis`. A missing client
//! fails its test with what to install; these tests never skip.

use std::path::{Path, PathBuf};
use std::process::Command;

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::google::bytestream as bs;
use prost::Message;
use sha2::Digest as _;
use strata_tests::serve::{agent, Server};
use strata_tests::*;

fn token(env: &Env, name: &str, read_only: bool) -> String {
    let mut args = vec!["serve", "token", "create", name];
    if read_only {
        args.push("--read-only");
    }
    env.ci(args).success().stdout_str().trim().to_owned()
}

/// `ci serve` for a store with a minimal workspace (the server needs one).
fn serve(env: &Env) -> Server {
    write(env.work(), "ci.toml", "name = \"app\"\n");
    Server::start(env, &["."], &[])
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&sha2::Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The Bazel binary: `$STRATA_BAZEL`, else the one npm put in the cache.
fn bazel_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("STRATA_BAZEL") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let dir = home.join(".cache/strata-bazel/node_modules/@bazel/bazel-linux_x64");
    let found = std::fs::read_dir(&dir).ok().and_then(|rd| {
        rd.flatten().map(|e| e.path()).find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("bazel-"))
        })
    });
    found.unwrap_or_else(|| {
        panic!(
            "Bazel is not installed in `{}`: run ./scripts/test (it runs `npm install --prefix ~/.cache/strata-bazel @bazel/bazel-linux_x64`), or set STRATA_BAZEL",
            dir.display()
        )
    })
}

/// A Bazel workspace of genrules that depend on each other; one output is
/// ~5 MiB (over the API's body limit and gRPC's default message size).
fn workspace(root: &Path) -> PathBuf {
    let ws = root.join("bazel-ws");
    write(&ws, "WORKSPACE", "");
    write(
        &ws,
        "BUILD",
        r#"genrule(name = "a", outs = ["a.txt"], cmd = "echo strata > $@")
genrule(name = "big", outs = ["big.txt"], cmd = "seq 1 800000 > $@")
genrule(name = "b", srcs = [":a", ":big"], outs = ["b.txt"],
        cmd = "cat $(location :a) > $@ && wc -l < $(location :big) >> $@")
genrule(name = "c", srcs = [":b"], outs = ["c.txt"], cmd = "tr a-z A-Z < $(location :b) > $@")
"#,
    );
    ws
}

/// Runs one Bazel build of everything in `ws` from the output base `base`
/// (in batch mode: no Bazel server is left behind) and returns its output.
fn bazel_build(env: &Env, ws: &Path, base: &str, flags: &[String]) -> String {
    let bin = bazel_bin();
    let user_root = env.root().join("bazel-root");
    let mut cmd = Command::new(&bin);
    cmd.current_dir(ws)
        .arg("--batch")
        .arg("--ignore_all_rc_files")
        .arg(format!("--output_user_root={}", user_root.display()))
        .arg(format!("--output_base={}", env.root().join(base).display()))
        .arg("--host_jvm_args=-Xmx1g")
        .args([
            "build",
            "--jobs=2",
            "--noshow_progress",
            "--color=no",
            "//:all",
        ])
        .args(flags)
        .env_remove("CI_STORE");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", bin.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "bazel build failed:\n{text}");
    text
}

/// Bazel's summary: `INFO: N processes: A remote cache hit, B linux-sandbox.`
fn processes(out: &str) -> (u64, Vec<String>) {
    let line = out
        .lines()
        .find(|l| l.contains(" processes: ") || l.contains(" process: "))
        .unwrap_or_else(|| panic!("no process summary in Bazel's output:\n{out}"));
    let (head, tail) = line
        .split_once(": ")
        .and_then(|(_, rest)| rest.split_once(": "))
        .unwrap_or_default();
    let n = head
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read `{line}`"));
    let kinds = tail
        .trim_end_matches('.')
        .split(", ")
        .map(str::to_owned)
        .collect();
    (n, kinds)
}

/// A build that fills the cache with `fill`, then one from a fresh output
/// base with `read` that must take every action from the cache.
fn two_builds(env: &Env, server: &Server, fill: &[String], read: &[String]) -> (String, String) {
    let ws = workspace(env.root());
    let first = bazel_build(env, &ws, "base1", fill);
    let (n, kinds) = processes(&first);
    assert!(n >= 4, "the first build ran {n} processes:\n{first}");
    assert!(
        !kinds.iter().any(|k| k.contains("remote cache hit")),
        "the first build already hit: {kinds:?}\n{first}"
    );
    let second = bazel_build(env, &ws, "base2", read);
    let (m, kinds) = processes(&second);
    assert_eq!(
        kinds,
        vec![format!("{m} remote cache hit")],
        "the second build, from a fresh output base, must be all remote cache hits:\n{second}\nserver log:\n{}",
        server.log()
    );
    assert_eq!(m, n, "{second}");
    (first, second)
}

fn metric(server: &Server, needle: &str) -> u64 {
    let text = server.get("/metrics").text();
    text.lines()
        .filter(|l| l.starts_with("strata_cache_requests") && l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn bazel_over_http_hits_the_cache_from_a_fresh_output_base() {
    let env = Env::new();
    let t = token(&env, "bazel", false);
    let server = serve(&env);
    // Under a path prefix, as teams share one server between projects.
    let flags = vec![
        format!("--remote_cache={}/some/prefix", server.url),
        format!("--remote_header=Authorization=Bearer {t}"),
    ];
    two_builds(&env, &server, &flags, &flags);
    assert!(metric(&server, "protocol=\"bazel-http\",result=\"hit\"") >= 4);
    assert!(metric(&server, "protocol=\"bazel-http\",result=\"stored\"") >= 4);
    env.ci(["store", "verify"]).success();
}

/// What Bazel stored over HTTP is a hit over gRPC (one store, one key
/// space). The cache is filled over HTTP because the only Bazel npm ships
/// (2.1.0) sends `--remote_header` on the ActionCache and CAS calls but not
/// on ByteStream writes, so its gRPC uploads are refused as unauthenticated;
/// REAPI writes are covered by `grpc_cache_services_edge_cases` (tonic).
#[test]
fn bazel_over_grpc_hits_what_bazel_stored_over_http() {
    let env = Env::new();
    let t = token(&env, "bazel", false);
    let server = serve(&env);
    let header = format!("--remote_header=Authorization=Bearer {t}");
    let grpc = vec![
        format!(
            "--remote_cache={}",
            server.url.replace("http://", "grpc://")
        ),
        header.clone(),
    ];
    let http = vec![format!("--remote_cache={}", server.url), header];
    two_builds(&env, &server, &http, &grpc);
    assert!(metric(&server, "protocol=\"reapi\",result=\"hit\"") >= 4);
    env.ci(["store", "verify"]).success();

    // A new action over gRPC: Bazel runs it, and its unauthenticated
    // uploads store nothing (the build still succeeds).
    let ws = env.root().join("bazel-ws");
    write(
        &ws,
        "BUILD",
        "genrule(name = \"d\", outs = [\"d.txt\"], cmd = \"echo other > $@\")\n",
    );
    let blobs = env.ci(["store", "du", "--json"]).json()["blobs"].clone();
    let out = bazel_build(&env, &ws, "base3", &grpc);
    assert_eq!(
        metric(&server, "protocol=\"reapi\",result=\"stored\""),
        0,
        "{out}"
    );
    assert_eq!(
        env.ci(["store", "du", "--json"]).json()["blobs"],
        blobs,
        "{out}"
    );
}

#[test]
fn ccache_hits_the_remote_cache_from_a_fresh_local_cache() {
    let env = Env::new();
    let t = token(&env, "ccache", false);
    let server = serve(&env);
    let src = env.root().join("cc");
    write(
        &src,
        "hello.c",
        "#include <stdio.h>\nint main(void) { puts(\"strata\"); return 0; }\n",
    );
    let remote = format!("{}/|layout=bazel|bearer-token={t}", server.url);
    let compile = |dir: &str| -> String {
        let cache = env.root().join(dir);
        let run = |args: &[&str]| {
            let out = Command::new("ccache")
                .args(args)
                .current_dir(&src)
                .env("CCACHE_DIR", &cache)
                .env("CCACHE_REMOTE_STORAGE", &remote)
                .env_remove("CCACHE_DISABLE")
                .output()
                .unwrap_or_else(|e| {
                    panic!("cannot run ccache (`apt-get install ccache`; ./scripts/test does): {e}")
                });
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "ccache {args:?}: {text}");
            text
        };
        run(&["cc", "-c", "hello.c", "-o", "hello.o"]);
        run(&["--print-stats"])
    };
    let stat = |stats: &str, key: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('\t')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `{key}` in ccache's stats:\n{stats}"))
    };
    let first = compile("ccache1");
    assert_eq!(stat(&first, "remote_storage_hit"), 0, "{first}");
    assert!(
        stat(&first, "remote_storage_write") >= 1,
        "{first}\n{}",
        server.log()
    );
    let second = compile("ccache2");
    assert!(
        stat(&second, "remote_storage_hit") >= 1,
        "the second compile, from an empty local cache, must hit the server:\n{second}\n{}",
        server.log()
    );
    assert_eq!(stat(&second, "remote_storage_error"), 0, "{second}");
    assert!(metric(&server, "protocol=\"bazel-http\",result=\"hit\"") >= 1);
    env.ci(["store", "verify"]).success();
}

/// One HTTP request with ureq: method, path, body, bearer token.
fn call(
    server: &Server,
    method: &str,
    path: &str,
    body: &[u8],
    token: Option<&str>,
) -> (u16, Vec<u8>) {
    let uri = format!("{}{path}", server.url);
    let mut req = ureq::http::Request::builder().method(method).uri(&uri);
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let req = req.body(body.to_vec()).expect("a request");
    let mut res = agent()
        .run(req)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", server.log()));
    let status = res.status().as_u16();
    let body = if method == "HEAD" {
        Vec::new()
    } else {
        res.body_mut().read_to_vec().unwrap_or_default()
    };
    (status, body)
}

fn action_result_naming(hash: &str, size: i64) -> Vec<u8> {
    reapi::ActionResult {
        output_files: vec![reapi::OutputFile {
            path: "out.txt".into(),
            digest: Some(reapi::Digest {
                hash: hash.into(),
                size_bytes: size,
            }),
            ..Default::default()
        }],
        exit_code: 0,
        ..Default::default()
    }
    .encode_to_vec()
}

#[test]
fn http_cache_protocol_edge_cases() {
    let env = Env::new();
    let w = token(&env, "writer", false);
    let r = token(&env, "reader", true);
    let server = serve(&env);
    let body = pseudo_random(7, 3 << 20);
    let sha = sha256_hex(&body);

    // Absent: 404 on GET and HEAD.
    assert_eq!(
        call(&server, "HEAD", &format!("/cas/{sha}"), b"", None).0,
        404
    );
    assert_eq!(
        call(&server, "GET", &format!("/cas/{sha}"), b"", None).0,
        404
    );
    // No token, a read-only token: refused before the body is read (so a
    // small body here: the server does not wait for a large one), nothing
    // stored.
    let small = b"small";
    let small_sha = sha256_hex(small);
    let put_small =
        |t: Option<&str>| call(&server, "PUT", &format!("/cas/{small_sha}"), small, t).0;
    assert_eq!(put_small(None), 401);
    assert_eq!(put_small(Some(&r)), 403);
    assert_eq!(put_small(Some("strata_bogus")), 401);
    assert_eq!(
        call(&server, "HEAD", &format!("/cas/{small_sha}"), b"", None).0,
        404
    );
    assert_eq!(
        call(&server, "HEAD", &format!("/cas/{sha}"), b"", None).0,
        404
    );
    // The wrong SHA-256: 400, nothing stored (not even under its own digest).
    let other = sha256_hex(b"something else");
    let (status, msg) = call(&server, "PUT", &format!("/cas/{other}"), &body, Some(&w));
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&msg));
    assert!(
        String::from_utf8_lossy(&msg).contains(&sha),
        "{}",
        String::from_utf8_lossy(&msg)
    );
    assert_eq!(
        call(&server, "HEAD", &format!("/cas/{sha}"), b"", None).0,
        404
    );
    assert_eq!(
        call(&server, "HEAD", &format!("/cas/{other}"), b"", None).0,
        404
    );
    assert_eq!(env.ci(["store", "du", "--json"]).json()["blobs"], 0);
    // Not a digest: 400.
    assert_eq!(call(&server, "GET", "/cas/xyz", b"", None).0, 400);
    // A 3 MiB upload (over the API's 1 MiB limit) is stored and read back,
    // also under a prefix.
    assert_eq!(
        call(&server, "PUT", &format!("/cas/{sha}"), &body, Some(&w)).0,
        204
    );
    assert_eq!(
        call(&server, "HEAD", &format!("/cas/{sha}"), b"", None).0,
        200
    );
    let (status, got) = call(&server, "GET", &format!("/a/b/cas/{sha}"), b"", None);
    assert_eq!(status, 200);
    assert!(got == body, "the content read back differs");

    // An action entry naming a missing blob is refused; once the blob is
    // there it is stored and answered.
    let out = b"the output\n";
    let out_sha = sha256_hex(out);
    let action = sha256_hex(b"an action");
    let entry = action_result_naming(&out_sha, out.len() as i64);
    let (status, msg) = call(&server, "PUT", &format!("/ac/{action}"), &entry, Some(&w));
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&msg));
    assert!(String::from_utf8_lossy(&msg).contains(&out_sha));
    assert_eq!(
        call(&server, "GET", &format!("/ac/{action}"), b"", None).0,
        404
    );
    assert_eq!(
        call(&server, "PUT", &format!("/cas/{out_sha}"), out, Some(&w)).0,
        204
    );
    assert_eq!(
        call(&server, "PUT", &format!("/ac/{action}"), &entry, Some(&w)).0,
        204
    );
    let (status, got) = call(&server, "GET", &format!("/ac/{action}"), b"", None);
    assert_eq!((status, got), (200, entry.clone()));
    assert_eq!(
        call(&server, "HEAD", &format!("/prefix/ac/{action}"), b"", None).0,
        200
    );
    // A read-only token cannot store an entry.
    let action2 = sha256_hex(b"another action");
    assert_eq!(
        call(&server, "PUT", &format!("/ac/{action2}"), &entry, Some(&r)).0,
        403
    );
    assert_eq!(
        call(&server, "PUT", &format!("/ac/{action2}"), &entry, None).0,
        401
    );
    assert_eq!(
        call(&server, "HEAD", &format!("/ac/{action2}"), b"", None).0,
        404
    );
    // Bytes that are not an ActionResult (ccache's) are kept as they came.
    let opaque = b"\xff\xfe not a protocol buffer".to_vec();
    assert_eq!(
        call(&server, "PUT", &format!("/ac/{action2}"), &opaque, Some(&w)).0,
        204
    );
    assert_eq!(
        call(&server, "GET", &format!("/ac/{action2}"), b"", None),
        (200, opaque)
    );

    // GC without keep-cache sweeps the unnamed blobs and the entries with them;
    // what remains is consistent.
    let metrics = server.get("/metrics").text();
    assert!(
        metrics.contains("cache_requests_total{protocol=\"bazel-http\",result=\"refused\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cache_requests_total{protocol=\"bazel-http\",result=\"hit\"} 3"),
        "{metrics}"
    );
    drop(server);
    let du = env.ci(["store", "du", "--json"]).json();
    assert_eq!(du["sha256"], 2, "{du}");
    assert_eq!(du["bazel_actions"], 2, "{du}");
    env.ci(["store", "verify"]).success();
    env.ci(["store", "gc"]).success();
    let du = env.ci(["store", "du", "--json"]).json();
    assert_eq!(
        (
            du["blobs"].as_u64(),
            du["sha256"].as_u64(),
            du["bazel_actions"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "{du}"
    );
    env.ci(["store", "verify"]).success();
}

fn digest(bytes: &[u8]) -> reapi::Digest {
    reapi::Digest {
        hash: sha256_hex(bytes),
        size_bytes: bytes.len() as i64,
    }
}

fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("metadata"),
    );
    req
}

#[test]
fn grpc_cache_services_edge_cases() {
    let env = Env::new();
    let w = token(&env, "writer", false);
    let r = token(&env, "reader", true);
    let server = serve(&env);
    let url = server.url.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async move {
        use reapi::action_cache_client::ActionCacheClient;
        use reapi::capabilities_client::CapabilitiesClient;
        use reapi::content_addressable_storage_client::ContentAddressableStorageClient;
        let channel = tonic::transport::Endpoint::from_shared(url)
            .expect("endpoint")
            .connect()
            .await
            .expect("connect over h2c");
        let mut caps = CapabilitiesClient::new(channel.clone());
        let mut cas = ContentAddressableStorageClient::new(channel.clone());
        let mut ac = ActionCacheClient::new(channel.clone());
        let mut bsc = bs::byte_stream_client::ByteStreamClient::new(channel);

        let c = caps
            .get_capabilities(reapi::GetCapabilitiesRequest::default())
            .await
            .expect("capabilities")
            .into_inner();
        let cc = c.cache_capabilities.expect("cache capabilities");
        assert!(cc
            .digest_functions
            .contains(&(reapi::digest_function::Value::Sha256 as i32)));
        assert!(cc
            .digest_functions
            .contains(&(reapi::digest_function::Value::Blake3 as i32)));
        assert!(cc
            .supported_compressors
            .contains(&(reapi::compressor::Value::Zstd as i32)));
        assert!(
            cc.action_cache_update_capabilities
                .expect("ac caps")
                .update_enabled
        );

        // FindMissingBlobs, then a batch where one blob's digest is wrong:
        // only that one is refused.
        let a = b"blob a".to_vec();
        let b = b"blob b".to_vec();
        let missing = cas
            .find_missing_blobs(reapi::FindMissingBlobsRequest {
                blob_digests: vec![digest(&a), digest(&b), digest(b"")],
                ..Default::default()
            })
            .await
            .expect("find missing")
            .into_inner()
            .missing_blob_digests;
        assert_eq!(missing, vec![digest(&a), digest(&b)]);
        let batch = reapi::BatchUpdateBlobsRequest {
            requests: vec![
                reapi::batch_update_blobs_request::Request {
                    digest: Some(digest(&a)),
                    data: a.clone(),
                    compressor: 0,
                },
                reapi::batch_update_blobs_request::Request {
                    digest: Some(digest(&b)),
                    data: b"not blob b".to_vec(),
                    compressor: 0,
                },
            ],
            ..Default::default()
        };
        let e = cas
            .batch_update_blobs(batch.clone())
            .await
            .expect_err("no token");
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = cas
            .batch_update_blobs(authed(batch.clone(), &r))
            .await
            .expect_err("read-only");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        let res = cas
            .batch_update_blobs(authed(batch, &w))
            .await
            .expect("batch update")
            .into_inner()
            .responses;
        let codes: Vec<i32> = res
            .iter()
            .map(|r| r.status.as_ref().map_or(0, |s| s.code))
            .collect();
        assert_eq!(codes, vec![0, tonic::Code::InvalidArgument as i32]);
        let missing = cas
            .find_missing_blobs(reapi::FindMissingBlobsRequest {
                blob_digests: vec![digest(&a), digest(&b)],
                ..Default::default()
            })
            .await
            .expect("find missing")
            .into_inner()
            .missing_blob_digests;
        assert_eq!(missing, vec![digest(&b)]);
        let read = cas
            .batch_read_blobs(reapi::BatchReadBlobsRequest {
                digests: vec![digest(&a), digest(&b)],
                ..Default::default()
            })
            .await
            .expect("batch read")
            .into_inner()
            .responses;
        assert_eq!(read[0].data, a);
        assert_eq!(
            read[1].status.as_ref().map(|s| s.code),
            Some(tonic::Code::NotFound as i32)
        );

        // ByteStream: a 5 MiB blob written in chunks, plain and compressed
        // (zstd), read back both ways, from an offset too.
        let big = pseudo_random(11, 5 << 20);
        let d = digest(&big);
        let write = |name: String, data: Vec<u8>| {
            let chunks: Vec<bs::WriteRequest> = data
                .chunks(1 << 20)
                .enumerate()
                .scan(0i64, |off, (i, c)| {
                    let req = bs::WriteRequest {
                        resource_name: if i == 0 { name.clone() } else { String::new() },
                        write_offset: *off,
                        finish_write: false,
                        data: c.to_vec(),
                    };
                    *off += c.len() as i64;
                    Some(req)
                })
                .collect();
            let n = chunks.len();
            let chunks: Vec<bs::WriteRequest> = chunks
                .into_iter()
                .enumerate()
                .map(|(i, mut c)| {
                    c.finish_write = i + 1 == n;
                    c
                })
                .collect();
            futures_util::stream::iter(chunks)
        };
        let name = format!("inst/uploads/0c1f/blobs/{}/{}", d.hash, d.size_bytes);
        let wrong = format!("uploads/0c1f/blobs/{}/{}", sha256_hex(b"x"), d.size_bytes);
        let e = bsc
            .write(authed(write(wrong, big.clone()), &w))
            .await
            .expect_err("a wrong digest is refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        let done = bsc
            .write(authed(write(name, big.clone()), &w))
            .await
            .expect("write")
            .into_inner();
        assert_eq!(done.committed_size, d.size_bytes);
        let reader = bsc.clone();
        let read_all = |name: String, offset: i64| {
            let mut client = reader.clone();
            async move {
                let mut s = client
                    .read(bs::ReadRequest {
                        resource_name: name,
                        read_offset: offset,
                        read_limit: 0,
                    })
                    .await
                    .expect("read")
                    .into_inner();
                let mut out = Vec::new();
                while let Some(m) = s.message().await.expect("read stream") {
                    out.extend_from_slice(&m.data);
                }
                out
            }
        };
        assert!(read_all(format!("inst/blobs/{}/{}", d.hash, d.size_bytes), 0).await == big);
        assert!(
            read_all(format!("blobs/{}/{}", d.hash, d.size_bytes), 1000).await[..] == big[1000..]
        );
        let z = read_all(
            format!("compressed-blobs/zstd/{}/{}", d.hash, d.size_bytes),
            0,
        )
        .await;
        assert!(zstd::decode_all(&z[..]).expect("zstd") == big);

        // A compressed upload of another blob, checked once uncompressed.
        let big2 = pseudo_random(12, 3 << 20);
        let d2 = digest(&big2);
        let compressed = zstd::encode_all(&big2[..], 3).expect("zstd");
        let name = format!(
            "uploads/1d2e/compressed-blobs/zstd/{}/{}",
            d2.hash, d2.size_bytes
        );
        let done = bsc
            .write(authed(write(name.clone(), compressed.clone()), &w))
            .await
            .expect("compressed write")
            .into_inner();
        assert_eq!(done.committed_size, compressed.len() as i64);
        assert!(read_all(format!("blobs/{}/{}", d2.hash, d2.size_bytes), 0).await == big2);
        let status = bsc
            .query_write_status(authed(
                bs::QueryWriteStatusRequest {
                    resource_name: name,
                },
                &w,
            ))
            .await
            .expect("query write status")
            .into_inner();
        assert!(status.complete);

        // GetTree: a root with one subdirectory holding blob a.
        let sub = reapi::Directory {
            files: vec![reapi::FileNode {
                name: "a".into(),
                digest: Some(digest(&a)),
                ..Default::default()
            }],
            ..Default::default()
        };
        let sub_bytes = sub.encode_to_vec();
        let root = reapi::Directory {
            directories: vec![reapi::DirectoryNode {
                name: "sub".into(),
                digest: Some(digest(&sub_bytes)),
            }],
            ..Default::default()
        };
        let root_bytes = root.encode_to_vec();
        let tree = reapi::Tree {
            root: Some(root.clone()),
            children: vec![sub.clone()],
        };
        let tree_bytes = tree.encode_to_vec();
        let up = |bytes: &Vec<u8>| reapi::batch_update_blobs_request::Request {
            digest: Some(digest(bytes)),
            data: bytes.clone(),
            compressor: 0,
        };
        cas.batch_update_blobs(authed(
            reapi::BatchUpdateBlobsRequest {
                requests: vec![up(&sub_bytes), up(&root_bytes)],
                ..Default::default()
            },
            &w,
        ))
        .await
        .expect("upload directories");
        let mut s = cas
            .get_tree(reapi::GetTreeRequest {
                root_digest: Some(digest(&root_bytes)),
                ..Default::default()
            })
            .await
            .expect("get tree")
            .into_inner();
        let mut dirs = Vec::new();
        while let Some(m) = s.message().await.expect("tree stream") {
            dirs.extend(m.directories);
        }
        assert_eq!(dirs, vec![root, sub]);

        // The action cache: a result naming a tree that is not stored is
        // refused; with the tree stored it is kept and answered.
        let action = digest(b"the action");
        let result = reapi::ActionResult {
            output_files: vec![reapi::OutputFile {
                path: "big".into(),
                digest: Some(d.clone()),
                ..Default::default()
            }],
            output_directories: vec![reapi::OutputDirectory {
                path: "dir".into(),
                tree_digest: Some(digest(&tree_bytes)),
                ..Default::default()
            }],
            stdout_digest: Some(digest(b"")),
            ..Default::default()
        };
        let update = reapi::UpdateActionResultRequest {
            action_digest: Some(action.clone()),
            action_result: Some(result.clone()),
            ..Default::default()
        };
        let e = ac
            .update_action_result(authed(update.clone(), &w))
            .await
            .expect_err("incomplete");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
        let e = ac
            .update_action_result(authed(update.clone(), &r))
            .await
            .expect_err("read-only");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        let get = reapi::GetActionResultRequest {
            action_digest: Some(action.clone()),
            ..Default::default()
        };
        let e = ac.get_action_result(get.clone()).await.expect_err("absent");
        assert_eq!(e.code(), tonic::Code::NotFound);
        cas.batch_update_blobs(authed(
            reapi::BatchUpdateBlobsRequest {
                requests: vec![up(&tree_bytes)],
                ..Default::default()
            },
            &w,
        ))
        .await
        .expect("upload the tree");
        ac.update_action_result(authed(update, &w))
            .await
            .expect("complete result");
        let got = ac.get_action_result(get).await.expect("hit").into_inner();
        assert_eq!(got, result);
    });
    let metrics = server.get("/metrics").text();
    assert!(
        metrics.contains("cache_requests_total{protocol=\"reapi\",result=\"hit\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cache_requests_total{protocol=\"reapi\",result=\"stored\"} 1"),
        "{metrics}"
    );
    drop(server);
    env.ci(["store", "verify"]).success();
    // With keep-cache semantics not asked for, GC keeps nothing of it.
    env.ci(["store", "gc"]).success();
    env.ci(["store", "verify"]).success();
}
