//! `ci analyze` (and the same analysis over HTTP): the critical path from
//! recorded durations, parallelism per level, pure tasks that never hit the
//! cache, impure tasks on the critical path.

use serde_json::Value;
use strata_tests::*;

fn build_file(env: &Env, word: &str) {
    write(
        env.work(),
        "BUILD.star",
        format!(
            r#"
task(name = "a", script = "echo a > a")
task(name = "slow", deps = [":a"], script = "sleep 0.4; echo s > s")
task(name = "quick", deps = [":a"], script = "echo q > q")
task(name = "deploy", deps = [":slow"], pure = False, script = "echo deployed > d")
task(name = "stamp", script = "echo {word} > w")
"#
        ),
    );
}

#[test]
fn analyze_finds_the_critical_path_and_tasks_that_never_hit() {
    let env = Env::new();
    write(env.work(), "ci.toml", "[build]\nexecutor = \"host\"\n");
    build_file(&env, "one");
    env.ci(["build"]).success();
    // `stamp` changes with nothing it reads changing; the rest is cached.
    build_file(&env, "two");
    env.ci(["build"]).success();
    let a: Value = env.ci(["--json", "analyze"]).success().json();
    let never: Vec<&str> = a["never_cached"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["label"].as_str().unwrap())
        .collect();
    assert_eq!(never, ["//:stamp"], "{a:#}");
    let levels = a["levels"].as_array().unwrap();
    assert_eq!(
        levels[0]["tasks"], 2,
        "`a` and `stamp` have no inputs: {a:#}"
    );
    // The first run's critical path goes through the slow task.
    let first = env.ci(["--json", "runs"]).success().json();
    let id = first.as_array().unwrap().last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let a1: Value = env.ci(["--json", "analyze", &id]).success().json();
    let path1: Vec<&str> = a1["critical_path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["label"].as_str().unwrap())
        .collect();
    assert_eq!(path1, ["//:a", "//:slow", "//:deploy"], "{a1:#}");
    assert!(a1["critical_ms"].as_u64().unwrap() >= 400);
    assert_eq!(
        a1["impure_on_critical_path"],
        serde_json::json!(["//:deploy"])
    );
    let human = env.ci(["analyze", &id]).success().stdout_str();
    assert!(
        human.contains("critical path") && human.contains("//:slow"),
        "{human}"
    );
}
