//! Action keys: the digest of a canonical, versioned encoding of everything
//! that goes into an action. The preimage is kept, so `ci explain` can say
//! field by field what changed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use strata_store::Digest;

/// Names the encoding; changing what goes into a key changes this.
pub const ACTION_VERSION: &str = "strata-action-1";

/// Everything an action's output may depend on. Serialized as JSON with
/// fields in declaration order and maps sorted, which makes it canonical.
/// Secret values never appear here: only their names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionPreimage {
    pub version: String,
    /// `run`, `merge`, `local_source` or `git_source`.
    pub kind: String,
    /// Where it runs: `host/linux-x86_64/sandbox` (a sandboxed host task;
    /// `host/linux-x86_64` without the sandbox), `docker/linux-x86_64`…
    pub platform: String,
    /// The image's content id (never a tag), for container tasks.
    pub image: Option<String>,
    /// The argv run (a script is `["/bin/sh", "-ec", script]`).
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Names of secret variables (their values never enter a key).
    pub secret_names: Vec<String>,
    /// Context inherited from ancestors (`KEY=VALUE` they wrote).
    pub context: BTreeMap<String, String>,
    /// Input mount name → layer.
    pub inputs: BTreeMap<String, Digest>,
    /// The layer the work directory starts from (a transform's or merge's base).
    pub base: Option<Digest>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub network: bool,
    /// Kind-specific fields: merge sides and policy, source path and layer,
    /// git commit, service definitions.
    pub extra: BTreeMap<String, String>,
}

impl ActionPreimage {
    pub fn new(kind: &str, platform: &str) -> ActionPreimage {
        ActionPreimage {
            version: ACTION_VERSION.to_owned(),
            kind: kind.to_owned(),
            platform: platform.to_owned(),
            image: None,
            command: Vec::new(),
            env: BTreeMap::new(),
            secret_names: Vec::new(),
            context: BTreeMap::new(),
            inputs: BTreeMap::new(),
            base: None,
            workdir: None,
            user: None,
            network: false,
            extra: BTreeMap::new(),
        }
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        // Plain structs, strings and sorted maps: serialization cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The action key.
    pub fn key(&self) -> Digest {
        Digest::of(&self.encode())
    }
}

fn short(d: &Digest) -> String {
    format!("{}…", &d.to_hex()[..8])
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "none".to_owned(), |x| format!("`{x}`"))
}

/// Compares maps, naming each key added, removed or changed.
fn diff_map<V: PartialEq>(
    what: &str,
    old: &BTreeMap<String, V>,
    new: &BTreeMap<String, V>,
    show: impl Fn(&V) -> String,
    out: &mut Vec<String>,
) {
    for (k, v) in new {
        match old.get(k) {
            None => out.push(format!("{what} `{k}` added ({})", show(v))),
            Some(o) if o != v => out.push(format!("{what} `{k}` changed {}→{}", show(o), show(v))),
            _ => {}
        }
    }
    for (k, v) in old {
        if !new.contains_key(k) {
            out.push(format!("{what} `{k}` removed (was {})", show(v)));
        }
    }
}

/// Says, field by field, how `new` differs from `old`. `input_labels` names
/// the task behind each input mount, for friendlier messages. Empty when the
/// keys are equal.
pub fn explain(
    old: &ActionPreimage,
    new: &ActionPreimage,
    input_labels: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut out = Vec::new();
    if old.version != new.version {
        out.push(format!(
            "key format changed `{}`→`{}`",
            old.version, new.version
        ));
    }
    if old.kind != new.kind {
        out.push(format!("kind changed `{}`→`{}`", old.kind, new.kind));
    }
    if old.platform != new.platform {
        out.push(format!(
            "platform changed `{}`→`{}`",
            old.platform, new.platform
        ));
    }
    if old.image != new.image {
        out.push(format!(
            "image changed {}→{}",
            opt(&old.image),
            opt(&new.image)
        ));
    }
    if old.command != new.command {
        out.push(format!(
            "command changed `{}`→`{}`",
            old.command.join(" "),
            new.command.join(" ")
        ));
    }
    // Values of env and context are shown: secrets never get here.
    diff_map("env", &old.env, &new.env, |v| format!("`{v}`"), &mut out);
    if old.secret_names != new.secret_names {
        out.push(format!(
            "secret names changed [{}]→[{}]",
            old.secret_names.join(", "),
            new.secret_names.join(", ")
        ));
    }
    diff_map(
        "context",
        &old.context,
        &new.context,
        |v| format!("`{v}`"),
        &mut out,
    );
    let mut inputs = Vec::new();
    diff_map("input", &old.inputs, &new.inputs, short, &mut inputs);
    for line in inputs {
        // "input `src` changed …" → "input `//src:tree` changed …"
        let named = input_labels.iter().fold(line, |l, (mount, label)| {
            l.replacen(&format!("input `{mount}`"), &format!("input `{label}`"), 1)
        });
        out.push(named);
    }
    if old.base != new.base {
        out.push(format!(
            "base changed {}→{}",
            old.base.as_ref().map_or("none".into(), short),
            new.base.as_ref().map_or("none".into(), short)
        ));
    }
    if old.workdir != new.workdir {
        out.push(format!(
            "workdir changed {}→{}",
            opt(&old.workdir),
            opt(&new.workdir)
        ));
    }
    if old.user != new.user {
        out.push(format!(
            "user changed {}→{}",
            opt(&old.user),
            opt(&new.user)
        ));
    }
    if old.network != new.network {
        out.push(format!("network changed {}→{}", old.network, new.network));
    }
    diff_map(
        "setting",
        &old.extra,
        &new.extra,
        |v| format!("`{v}`"),
        &mut out,
    );
    out
}
