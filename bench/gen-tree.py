#!/usr/bin/env python3
"""Generate a deterministic directory tree (or one big file) for Strata benchmarks.

    bench/gen-tree.py [--files N] [--total-mib M] [--seed S] [--symlinks K] TARGET_DIR
    bench/gen-tree.py --single-file-gib G [--seed S] PATH

Tree mode writes N files totalling about M MiB into TARGET_DIR (which must not exist
or be empty): mostly small files (100 B - 16 KiB, text-like), some 64 KiB - 1 MiB,
a few 4 - 16 MiB (binary), a handful of empty files and exact duplicates, nested up
to 6 levels in ~N/20 directories (clamped to 100..2000, a few of them left empty),
~5% executable files and ~N/100 relative symlinks (to files, to directories, a few
dangling). Every file, directory and symlink gets the same fixed mtime (--mtime,
default 2020-01-01; -1 leaves the current time), so that tools with "racily clean"
logic (git, stat caches) are not penalised right after generation.

Single-file mode writes G GiB (fractions allowed) of non-zero, non-repeating
content: a seeded 1 MiB block, rotated per chunk, each chunk prefixed by its index.

The same arguments give the same bytes, modes, names and symlink targets on every
run (Python >= 3.9; only Random.random/getrandbits/randbytes are used, whose output
is stable across Python versions). Standard library only.
"""

import argparse
import bisect
import os
import random
import struct
import sys
import time

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30

MAX_DEPTH = 6
BIN_POOL = 32 * MIB  # larger than the largest file, so every file is one slice
TEXT_POOL = 2 * MIB
DEFAULT_MTIME = 1577836800  # 2020-01-01T00:00:00Z

SYLLABLES = (
    "ka lo mi ter zu an ex or ri ven sto pa qu el dra mon fi sel tra no be "
    "gan hul wi cor dex ion lu par sin vo ma ne re ta pi cu ro ga fe xo ly"
).split()
TEXT_EXTS = (".rs", ".c", ".h", ".py", ".txt", ".md", ".json", ".toml", ".js", ".go", ".sh", ".yaml")
BIN_EXTS = (".bin", ".png", ".so", ".a", ".o", ".tar", ".woff2", ".jpg", ".pack", ".db")
WORDS = (
    "fn let mut impl struct enum pub use return if else for while match self "
    "the a of to in and is it that for data value result error config build "
    "store layer tree blob digest task action run cache index file path name "
    "size count len buf read write open close hash key map list item node"
).split()


def rand_int(rng, lo, hi):
    """Uniform integer in [lo, hi] (stable: built on getrandbits via randrange)."""
    return lo + rng.randrange(hi - lo + 1)


def log_uniform(rng, lo, hi):
    # exp(uniform(log lo, log hi)) without relying on anything but random()
    return int(lo * (hi / lo) ** rng.random())


def make_name(rng, syllables=None):
    n = syllables or rand_int(rng, 1, 3)
    return "".join(SYLLABLES[rng.randrange(len(SYLLABLES))] for _ in range(n))


def make_text_pool(rng, size):
    out = bytearray()
    indent = 0
    while len(out) < size:
        nwords = rand_int(rng, 0, 12)
        line = " " * (4 * indent) + " ".join(WORDS[rng.randrange(len(WORDS))] for _ in range(nwords))
        r = rng.random()
        if r < 0.15 and indent < 4:
            line += " {"
            indent += 1
        elif r < 0.30 and indent > 0:
            indent -= 1
            line = " " * (4 * indent) + "}"
        elif nwords:
            line += ";"
        out += line.encode() + b"\n"
    return bytes(out[:size])


def write_all(fd, bufs):
    for b in bufs:
        mv = memoryview(b)
        while len(mv):
            n = os.write(fd, mv)
            mv = mv[n:]


def plan_sizes(rng, files, total):
    """Return a list of (size, kind) with kind in 'text'/'bin'/'empty'/'dup'."""
    n_large = max(0, round(files * 0.0005))
    large = []
    for _ in range(n_large):
        s = rand_int(rng, 4 * MIB, 16 * MIB)
        if sum(large) + s > 0.4 * total:
            break
        large.append(s)
    n_empty = files // 200
    n_dup = files // 100
    n_rest = max(0, files - len(large) - n_empty - n_dup)

    small_mean = (16 * KIB - 100) / 5.0988  # mean of log-uniform(100, 16 KiB)
    med_mean = (1 * MIB - 64 * KIB) / 2.7726  # mean of log-uniform(64 KiB, 1 MiB)
    # Duplicates copy small files only, so they cost about small_mean each.
    remaining = total - sum(large) - (n_rest + n_dup) * small_mean
    n_med = max(1, round(remaining / (med_mean - small_mean))) if remaining > 0 else 0
    n_med = min(n_med, n_rest // 2)
    n_small = n_rest - n_med

    small = [log_uniform(rng, 100, 16 * KIB) for _ in range(n_small)]
    med = [log_uniform(rng, 64 * KIB, 1 * MIB) for _ in range(n_med)]
    # Scale the medium files so the total lands on the target (clamped to their range).
    want = total - sum(large) - sum(small) - n_dup * small_mean
    for _ in range(4):
        have = sum(med)
        if not med or have == want or want <= 0:
            break
        f = want / have
        med = [min(1 * MIB, max(64 * KIB, int(s * f))) for s in med]

    plan = [(s, "text" if rng.random() < 0.75 else "bin") for s in small]
    plan += [(s, "bin") for s in med]
    plan += [(s, "bin") for s in large]
    plan += [(0, "empty")] * n_empty
    plan += [(-1, "dup")] * n_dup
    # Deterministic shuffle (Fisher-Yates on randrange).
    for i in range(len(plan) - 1, 0, -1):
        j = rng.randrange(i + 1)
        plan[i], plan[j] = plan[j], plan[i]
    # A duplicate must come after at least one small real file.
    if plan and not (plan[0][1] in ("text", "bin") and plan[0][0] <= 16 * KIB):
        for i, p in enumerate(plan):
            if p[1] in ("text", "bin") and p[0] <= 16 * KIB:
                plan[0], plan[i] = plan[i], plan[0]
                break
    return plan


def gen_tree(args):
    t0 = time.monotonic()
    root = args.target
    if os.path.lexists(root):
        if not os.path.isdir(root) or os.path.islink(root) or os.listdir(root):
            sys.exit(f"gen-tree: {root} exists and is not an empty directory")
    else:
        os.makedirs(root)

    rng = random.Random(args.seed)
    files = args.files
    total = int(args.total_mib * MIB)
    n_symlinks = files // 100 if args.symlinks is None else args.symlinks

    bin_pool = rng.randbytes(BIN_POOL)
    text_pool = make_text_pool(rng, TEXT_POOL)
    bin_mv, text_mv = memoryview(bin_pool), memoryview(text_pool)

    # --- directories -----------------------------------------------------------
    n_dirs = min(2000, max(100, files // 20))
    n_empty_dirs = min(10, max(2, n_dirs // 100))
    dirs = [""]  # relative paths; "" is the root
    depth = {"": 0}
    names_in = {"": set()}
    leaves_only = set()  # empty dirs: nothing goes in them
    for i in range(n_dirs - 1):
        empty = i >= n_dirs - 1 - n_empty_dirs
        while True:
            parent = dirs[rng.randrange(len(dirs))]
            if depth[parent] < MAX_DEPTH and parent not in leaves_only:
                break
        name = make_name(rng)
        if name in names_in[parent]:
            name = f"{name}{i}"
        names_in[parent].add(name)
        path = f"{parent}/{name}" if parent else name
        dirs.append(path)
        depth[path] = depth[parent] + 1
        names_in[path] = set()
        if empty:
            leaves_only.add(path)
    for d in dirs[1:]:
        os.mkdir(os.path.join(root, d))

    fill_dirs = [d for d in dirs if d not in leaves_only]
    cum, acc = [], 0.0
    for _ in fill_dirs:
        acc += 0.1 + rng.random() ** 3  # skewed: a few big directories, many small
        cum.append(acc)

    def pick_dir():
        return fill_dirs[min(len(fill_dirs) - 1, bisect.bisect_right(cum, rng.random() * acc))]

    def unique_name(d, base, ext):
        name = base + ext
        k = 1
        while name in names_in[d]:
            name = f"{base}-{k}{ext}"
            k += 1
        names_in[d].add(name)
        return name

    # --- files -----------------------------------------------------------------
    plan = plan_sizes(rng, files, total)
    mtime = args.mtime
    written = []  # (relpath, size, kind, pool offset, header) of small files, for duplicates
    file_paths = []
    n_exec = total_bytes = 0
    for idx, (size, kind) in enumerate(plan):
        d = pick_dir()
        if kind == "dup" and not written:  # only possible for tiny --files counts
            size, kind = 100, "text"
        if kind == "dup":
            src = written[rng.randrange(len(written))]
            size, kind, off, src_path = src[1], src[2], src[3], src[0]
            ext = os.path.splitext(src_path)[1]
        else:
            src_path = None
            off = None
            ext = (TEXT_EXTS if kind in ("text", "empty") else BIN_EXTS)[rng.randrange(10)]
        rel = unique_name(d, make_name(rng), ext)
        rel = f"{d}/{rel}" if d else rel
        executable = rng.random() < 0.05
        mode = 0o755 if executable else 0o644
        n_exec += executable

        if kind == "empty":
            bufs = []
        else:
            if src_path is None:
                header = (f"// {idx} {rel}\n" if kind == "text" else f"\x7fSTRATA{idx:08d}\n").encode()
                header = header[:size]
                body = size - len(header)
                pool, mv = (text_pool, text_mv) if kind == "text" else (bin_pool, bin_mv)
                off = rng.randrange(len(pool) - body + 1)
                if size <= 16 * KIB:  # duplicates are of small files (LICENSE, __init__.py...)
                    written.append((rel, size, kind, off, header))
            else:
                header = src[4]
                body = size - len(header)
                mv = text_mv if kind == "text" else bin_mv
            bufs = [header, mv[off:off + body]]
        fd = os.open(os.path.join(root, rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            write_all(fd, bufs)
            os.fchmod(fd, mode)
            if mtime >= 0:
                os.utime(fd, (mtime, mtime))
        finally:
            os.close(fd)
        file_paths.append(rel)
        total_bytes += size

    # --- symlinks --------------------------------------------------------------
    n_dangling = max(1, n_symlinks // 40) if n_symlinks else 0
    for i in range(n_symlinks):
        d = pick_dir()
        r = rng.random()
        if i < n_dangling:
            target_rel = (f"{d}/" if d else "") + "missing/" + make_name(rng) + ".txt"
        elif r < 0.25:
            # A directory that is neither this one nor one of its ancestors (no loops).
            while True:
                target_rel = dirs[1 + rng.randrange(len(dirs) - 1)]
                if not (d == target_rel or d.startswith(target_rel + "/")):
                    break
        else:
            target_rel = file_paths[rng.randrange(len(file_paths))]
        target = os.path.relpath(target_rel, d or ".")
        name = unique_name(d, "link-" + make_name(rng, 2), "")
        link = os.path.join(root, d, name)
        os.symlink(target, link)
        if mtime >= 0:
            os.utime(link, (mtime, mtime), follow_symlinks=False)

    if mtime >= 0:
        for d in sorted(dirs, key=lambda p: -p.count("/") - (1 if p else 0)):
            os.utime(os.path.join(root, d) if d else root, (mtime, mtime))

    dt = time.monotonic() - t0
    print(
        f"gen-tree: {root}: {len(file_paths)} files ({n_exec} executable), "
        f"{total_bytes / MIB:.1f} MiB, {len(dirs) - 1} dirs ({n_empty_dirs} empty), "
        f"{n_symlinks} symlinks ({n_dangling} dangling), seed {args.seed}, {dt:.1f} s",
        file=sys.stderr,
    )


def gen_single(args):
    t0 = time.monotonic()
    path = args.target
    if os.path.lexists(path):
        sys.exit(f"gen-tree: {path} already exists")
    size = int(args.single_file_gib * GIB)
    rng = random.Random(args.seed)
    block = rng.randbytes(MIB)
    mv = memoryview(block)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        i = done = 0
        while done < size:
            n = min(MIB, size - done)
            header = struct.pack("<QQ", i, args.seed & 0xFFFFFFFFFFFFFFFF)[:n]
            rot = (i * 104729) % MIB
            body = n - len(header)
            first = mv[rot:rot + body]
            bufs = [header, first, mv[:body - len(first)]]
            expected = sum(len(b) for b in bufs)
            w = os.writev(fd, bufs)
            if w != expected:  # short write: finish the rest the slow way
                write_all(fd, [b"".join(bytes(b) for b in bufs)[w:]])
            done += n
            i += 1
        if args.mtime >= 0:
            os.utime(fd, (args.mtime, args.mtime))
    finally:
        os.close(fd)
    dt = time.monotonic() - t0
    print(f"gen-tree: {path}: {size / GIB:.2f} GiB, seed {args.seed}, {dt:.1f} s", file=sys.stderr)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=20000, help="number of regular files (default 20000)")
    p.add_argument("--total-mib", type=float, default=300, help="approximate total size in MiB (default 300)")
    p.add_argument("--seed", type=int, default=1, help="PRNG seed (default 1)")
    p.add_argument("--symlinks", type=int, default=None, help="number of symlinks (default files/100)")
    p.add_argument("--mtime", type=int, default=DEFAULT_MTIME,
                   help=f"mtime for every entry, seconds since epoch (default {DEFAULT_MTIME}; -1: leave as is)")
    p.add_argument("--single-file-gib", type=float, default=None, metavar="G",
                   help="write one file of G GiB at TARGET instead of a tree")
    p.add_argument("target", help="directory to create (tree mode) or file to create (--single-file-gib)")
    args = p.parse_args()
    if args.single_file_gib is not None:
        if args.single_file_gib <= 0:
            p.error("--single-file-gib must be > 0")
        gen_single(args)
    else:
        if args.files < 1 or args.total_mib <= 0:
            p.error("--files must be >= 1 and --total-mib > 0")
        gen_tree(args)


if __name__ == "__main__":
    main()
