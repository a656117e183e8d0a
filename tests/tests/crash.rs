//! Crash safety: `ci store add` killed with SIGKILL at many moments never
//! leaves the store inconsistent, and a later add gives the same digest.
//!
//! An add into an empty store spends most of its time writing blobs; an add
//! of a tree whose blobs are all stored spends it walking, hashing and
//! writing records. Both are killed: "cold" adds (after a `gc` emptied the
//! store), each resuming the blob writing where the previous one was killed,
//! then "warm" adds at moments spread over the measured duration of a warm one.
//! The delays are a timing spread, not a wait for an event: whatever the
//! machine's speed, the kills land all along the operation.

use std::time::{Duration, Instant};

use strata_tests::*;

/// Small files in the tree. Creating and deleting files dominates the
/// test's time; with these sizes it takes 30 to 50 s in a debug build.
const FILES: usize = 1000;
const BIG: [usize; 3] = [2 << 20, 4 << 20, 8 << 20];
/// Rounds of adds into an emptied store, `CHECK_EVERY` adds each.
const COLD_ROUNDS: usize = 2;
/// Kills of any kind required in all.
const KILLS: usize = 50;
/// Every this many attempts (and at the end), a full add must give the
/// expected digest.
const CHECK_EVERY: usize = 5;

struct Crasher<'a> {
    env: &'a Env,
    expected: String,
    attempts: usize,
    kills: usize,
}

impl Crasher<'_> {
    /// Starts an add, kills it after `delay` unless it finished first, and
    /// checks the store.
    fn attempt(&mut self, delay: Duration) {
        self.attempts += 1;
        // `--no-stat-cache`: every attempt reads and hashes every file.
        let add = self.env.spawn(["store", "add", "--no-stat-cache", "tree"]);
        match add.kill_after(delay) {
            None => self.kills += 1,
            // It won the race: then it must have done its job.
            Some(out) => assert_eq!(out.success().digest(), self.expected),
        }
        self.env.ci(["store", "verify"]).success();
        if self.attempts.is_multiple_of(CHECK_EVERY) {
            self.check();
        }
    }

    /// A full add (through the stat cache) gives the expected digest.
    fn check(&self) {
        let digest = self.env.ci(["store", "add", "tree"]).success().digest();
        assert_eq!(
            digest, self.expected,
            "after {} attempts, {} kills",
            self.attempts, self.kills
        );
        self.env.ci(["store", "verify"]).success();
    }
}

#[test]
fn add_killed_at_many_moments_leaves_a_consistent_store() {
    let started = Instant::now();
    let env = Env::new();
    gen_tree(&env.path("tree"), FILES, &BIG, 42);

    // The expected digest, and how long a cold and a warm add take, learned
    // in a store of their own.
    let solo = env.root().join("solo");
    let solo = solo.to_str().unwrap();
    // Created first: making the index is not part of the adds to time.
    env.ci(["--store", solo, "store", "gc"]).success();
    let timed = || {
        let start = Instant::now();
        let out = env.ci(["--store", solo, "store", "add", "--no-stat-cache", "tree"]);
        (out.success().digest(), start.elapsed())
    };
    let (expected, cold) = timed();
    let (again, warm) = timed();
    assert_eq!(again, expected);
    eprintln!(
        "setup {:?}; a cold add takes {cold:?}, a warm one {warm:?}",
        started.elapsed()
    );

    let mut c = Crasher {
        env: &env,
        expected,
        attempts: 0,
        kills: 0,
    };
    // Cold: rounds of adds into a store emptied by `gc`, each add resuming
    // the blob writing where the one before was killed: killed after about
    // the walk and hashing of a warm add (varied) plus a share of the rest.
    let share = cold.saturating_sub(warm) / CHECK_EVERY as u32;
    for round in 0..COLD_ROUNDS {
        env.ci(["store", "gc", "--keep-runs", "0"]).success();
        for j in 0..CHECK_EVERY {
            let f = 0.5 + (j as f64 + 0.5 * round as f64) / CHECK_EVERY as f64;
            // The last attempt of a round is followed by a full add: `check`.
            c.attempt(warm.mul_f64(f) + share);
        }
    }
    eprintln!(
        "{} kills in {} cold attempts, {:?}",
        c.kills,
        c.attempts,
        started.elapsed()
    );

    // Warm: every blob is stored; the rest of the kills, at moments spread
    // over a warm add, each pass offset from the one before.
    let slots = KILLS - c.kills;
    let mut i = 0;
    while c.kills < KILLS {
        assert!(
            i < 3 * slots,
            "only {} of {} adds were still running when killed; a cold add took \
             {cold:?}, a warm one {warm:?}",
            c.kills,
            c.attempts
        );
        let pass = (i / slots) as u32;
        let delay = spread(warm, i % slots, slots) + warm / (slots as u32 * (pass + 2));
        c.attempt(delay.min(warm));
        i += 1;
    }
    c.check();
    eprintln!(
        "{} kills in {} attempts, {:?}",
        c.kills,
        c.attempts,
        started.elapsed()
    );
}

/// The `i`-th of `n` moments spread evenly over `total`.
fn spread(total: Duration, i: usize, n: usize) -> Duration {
    total * i as u32 / n as u32
}
