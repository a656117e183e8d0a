//! Git sources through the `git` command: resolve a ref to a commit id (the
//! key), then fetch exactly that commit into a scratch directory.

use std::path::Path;

use crate::BuildError;

fn git_err(url: &str, what: &str, detail: &str) -> BuildError {
    BuildError::ExecutorUnavailable {
        executor: "git".into(),
        reason: format!("{what} `{url}`: {}", detail.trim()),
    }
}

async fn git(args: &[&str], cwd: Option<&Path>) -> Result<std::process::Output, std::io::Error> {
    let mut cmd = tokio::process::Command::new("git");
    cmd.args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    cmd.output().await
}

/// The commit id `rev` (a branch, tag or commit id) names in the repository at `url`.
pub async fn resolve(url: &str, rev: &str) -> Result<String, BuildError> {
    if rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(rev.to_ascii_lowercase());
    }
    let out = git(&["ls-remote", "--", url, rev], None)
        .await
        .map_err(|e| git_err(url, "cannot run `git ls-remote` for", &e.to_string()))?;
    if !out.status.success() {
        return Err(git_err(
            url,
            "cannot list refs of",
            &String::from_utf8_lossy(&out.stderr),
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // Prefer an exact branch or tag; a peeled tag (`^{}`) names the commit.
    let mut best: Option<(u8, String)> = None;
    for line in text.lines() {
        let Some((id, name)) = line.split_once('\t') else {
            continue;
        };
        let rank = if name == format!("refs/tags/{rev}^{{}}") {
            0
        } else if name == format!("refs/heads/{rev}") || name == rev {
            1
        } else if name == format!("refs/tags/{rev}") {
            2
        } else {
            3
        };
        if best.as_ref().is_none_or(|(r, _)| rank < *r) {
            best = Some((rank, id.to_owned()));
        }
    }
    best.map(|(_, id)| id).ok_or_else(|| {
        git_err(
            url,
            &format!("no branch or tag `{rev}` in"),
            "check the `ref` of the git_source",
        )
    })
}

/// Checks out `commit` of `url` into `dir` (created), without history.
pub async fn fetch(url: &str, commit: &str, dir: &Path) -> Result<(), BuildError> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(BuildError::io("create", dir))?;
    for args in [
        vec!["init", "-q"],
        vec!["fetch", "-q", "--depth", "1", "--", url, commit],
        vec![
            "-c",
            "advice.detachedHead=false",
            "checkout",
            "-q",
            "FETCH_HEAD",
        ],
    ] {
        let out = git(&args, Some(dir))
            .await
            .map_err(|e| git_err(url, "cannot run git for", &e.to_string()))?;
        if !out.status.success() {
            return Err(git_err(
                url,
                &format!("`git {}` failed for", args[0]),
                &String::from_utf8_lossy(&out.stderr),
            ));
        }
    }
    Ok(())
}
