"""The ``cache`` section of tools/bench: cold against warm runs of the same inputs.

Two workloads, each in rounds of three runs on the same inputs:

* one 1 GiB file read whole: ``exec --stats=json -- sh -c 'cat big.bin > /dev/null'``;
* 500 files of 256 KiB in one directory, read by a batch job that names the directory
  (so the client's manifest lists them and the agent can fetch what it lacks before the
  job opens them): ``exec -- python3 -c '<read every file of argv[1]>' small``.

The three runs of a round:

cold
    new bytes in every input (16 random bytes written at offset 0, so the remote content
    store cannot have them) and a new, empty client hash index (XDG_CACHE_HOME of the
    client process);
warm
    the same inputs again, same client index: the store has them, the index knows them;
new index
    the same inputs again with another new, empty client index: what a second client,
    or the same file copied or ``touch``ed (its ctime changes), costs when the remote
    already has the content.

Each round also times ``ssh host true`` and ``exec -- true``, for the warm run's
overhead over plain ssh. The store objects of a round are deleted when it ends. The
agent's store is the bench run's own (see tools/bench), so nobody else's
``cache --clear`` can turn a warm run cold.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import bench_lib as bl

SMALL_JOB = (
    'import os,sys; [open(os.path.join(sys.argv[1],f),"rb").read() '
    "for f in sorted(os.listdir(sys.argv[1]))]"
)
BIG_CMD = "cat big.bin > /dev/null"
AGENT = "agent (python)"
CLIENT = "client (python)"


def add_arguments(ap) -> None:
    g = ap.add_argument_group("cache section")
    g.add_argument(
        "--cache-rounds", type=int, default=None, help="cold/warm rounds (default 5; --quick 2)"
    )
    g.add_argument("--cache-big-mib", type=int, default=1024, help="big input (default 1024)")
    g.add_argument("--cache-small-count", type=int, default=500, help="small inputs (500)")
    g.add_argument("--cache-small-kib", type=int, default=256, help="small input size (256)")


def make_root(big: int, count: int, small: int) -> Path:
    root = Path(tempfile.mkdtemp(prefix="topyaz-bench-cache-"))
    os.chmod(root, 0o700)
    bl.write_random_file(root / "big.bin", big)
    (root / "small").mkdir()
    for i in range(count):
        with open(root / "small" / f"in{i:05d}.bin", "wb") as fh:
            fh.write(os.urandom(small))
    return root


class CacheBench:
    def __init__(self, env: SimpleNamespace, root: Path, big: int, count: int, small: int):
        self.env = env
        self.root = root
        self.big = big
        self.count = count
        self.small = small
        self.bench = env.make_bench(root, big, sync_before=True)
        self.idx_n = 0
        self.notes: list[str] = []
        self.digests: list[bytes] = []  # this round's content versions (deleted after it)
        self.res: dict[str, list[bl.RunResult]] = {}
        # What verifying the store object costs a warm run (the agent's hash_fd).
        self.hash_seconds = bl.time_hash_fd(env.snap / "python", [root / "big.bin"])

    # --- inputs and indexes ---------------------------------------------------------

    def new_index(self) -> dict[str, str]:
        """The client's environment with a new, empty hash index."""
        self.idx_n += 1
        d = self.env.workdir / f"cache-client-{self.idx_n}"
        d.mkdir()
        return dict(self.bench.tm_env, XDG_CACHE_HOME=str(d))

    def freshen_big(self) -> None:
        self.digests.append(bl.freshen(self.root / "big.bin"))

    def freshen_small(self) -> None:
        for path in sorted((self.root / "small").iterdir()):
            self.digests.append(bl.freshen(path))

    def drop_round_objects(self) -> None:
        bl.remove_objects(self.env.store_dir, self.digests)
        self.digests = []

    # --- runs -----------------------------------------------------------------------

    def argv(self, workload: str) -> list[str]:
        if workload == "big":
            return [*self.bench.tm_argv(), "--", "sh", "-c", BIG_CMD]
        return [*self.bench.tm_argv(), "--", "python3", "-c", SMALL_JOB, "small"]

    def _timed(self, argv: list[str], tm_env: dict[str, str]) -> bl.RunResult:
        return bl.timed_run(argv, remote_root=self.env.host.pid, cwd=str(self.root), env=tm_env)

    def add(self, key: str, res: bl.RunResult) -> None:
        self.res.setdefault(key, []).append(res)

    def cold(self, workload: str) -> dict[str, str]:
        """A cold run; returns the client environment whose index now knows the inputs."""

        def once():
            (self.freshen_big if workload == "big" else self.freshen_small)()
            tm_env = self.new_index()
            return self._timed(self.argv(workload), tm_env), tm_env

        res, tm_env = self.bench.measure(f"{workload} cold", once)
        self.add(f"{workload}_cold", res)
        return tm_env

    def warm(self, workload: str, tm_env: dict[str, str] | None, key: str) -> None:
        """Same inputs again: with ``tm_env`` (its index knows them), or, when None, with
        a new, empty index (a new one for every attempt, as a discarded run filled it)."""
        res = self.bench.measure(
            f"{workload} {key}",
            lambda: self._timed(self.argv(workload), tm_env or self.new_index()),
        )
        self.add(f"{workload}_{key}", res)

    def startups(self) -> None:
        self.add("ssh_true", self.bench.run([*self.bench.ssh_argv(), "true"], label="ssh true"))
        self.add(
            "tm_true",
            self.bench.run([*self.bench.tm_argv(), "--", "true"], label="exec true"),
        )

    def rounds(self, n: int) -> None:
        say = self.env.say
        # unrecorded warm-ups: .pyc files, the remote venv, sshd's first fork
        self.bench.run([*self.bench.ssh_argv(), "true"])
        self.bench.run([*self.bench.tm_argv(), "--", "true"])
        for i in range(n):
            self.startups()
            for workload in ("big", "small"):
                tm_env = self.cold(workload)
                self.warm(workload, tm_env, "warm")
                self.warm(workload, None, "newidx")
                r = {k: self.res[f"{workload}_{k}"][-1] for k in ("cold", "warm", "newidx")}
                say(
                    f"cache round {i + 1}/{n} {workload}: cold {r['cold'].wall:.2f} s, warm "
                    f"{r['warm'].wall:.2f} s, new index {r['newidx'].wall:.2f} s; content "
                    f"sent {sent(r['cold'])}/{sent(r['warm'])}/{sent(r['newidx'])} B"
                )
            self.drop_round_objects()

    def count_requests(self) -> dict[str, dict[str, int]]:
        """One untimed cold and warm run of each workload with the client counting the
        requests it serves, by type."""
        out: dict[str, dict[str, int]] = {}
        for workload in ("big", "small"):
            (self.freshen_big if workload == "big" else self.freshen_small)()
            tm_env = self.new_index()
            for key in ("cold", "warm"):
                counts, err = bl.count_requests(
                    self.argv(workload), cwd=self.root, env=tm_env, workdir=self.env.workdir
                )
                out[f"{workload}_{key}"] = counts
                if err:
                    self.notes.append(f"request count run {workload} {key} failed: {err}")
        self.drop_round_objects()
        return out

    def profile(self) -> dict:
        """py-spy on one more warm run of each workload (the job waits 0.5 s first)."""
        out = {}
        for workload in ("big", "small"):
            tm_env = self.cold(workload)
            self.res[f"{workload}_cold"].pop()  # not reported
            if workload == "big":
                tail = ["sh", "-c", f"sleep 0.5; {BIG_CMD}"]
            else:
                tail = ["sh", "-c", 'sleep 0.5; exec python3 -c "$0" "$1"', SMALL_JOB, "small"]
            argv = [*self.bench.tm_argv(), "--", *tail]
            out[workload] = bl.profile_run(
                argv,
                cwd=str(self.root),
                env=tm_env,
                remote_root=self.env.host.pid,
                outdir=self.env.workdir,
                tag=f"cache-{workload}",
            )
        self.drop_round_objects()
        return out


# --------------------------------------------------------------------------- report


def sent(r: bl.RunResult) -> int:
    return int((r.stats or {}).get("content_bytes_sent", -1))


def stat_med(rs: list[bl.RunResult], key: str) -> float:
    return statistics.median([float((r.stats or {}).get(key, 0)) for r in rs])


def stat_sum(rs: list[bl.RunResult], key: str) -> int:
    return int(sum(float((r.stats or {}).get(key, 0)) for r in rs))


def walls(rs: list[bl.RunResult]) -> bl.Series:
    return bl.Series([r.wall for r in rs])


def med(rs: list[bl.RunResult], fn) -> float:
    return statistics.median([fn(r) for r in rs])


def run(env: SimpleNamespace) -> tuple[str, str, bool]:
    args = env.args
    n = args.cache_rounds or (2 if args.quick else 5)
    big = args.cache_big_mib << 20
    count, small = args.cache_small_count, args.cache_small_kib << 10
    t0 = time.perf_counter()
    load_before = bl.loadavg()
    env.say(f"cache: writing a {big >> 20} MiB file and {count} x {small >> 10} KiB files")
    root = make_root(big, count, small)
    cb = None
    try:
        cb = CacheBench(env, root, big, count, small)
        cb.rounds(n)
        env.say("cache: counting the client's requests (untimed runs)")
        counts = cb.count_requests()
        prof = cb.profile() if args.profile else None
        md, table, ok = report(env, cb, n, prof, counts, time.perf_counter() - t0, load_before)
        return md, table, ok
    finally:
        if cb is not None:
            cb.drop_round_objects()
        shutil.rmtree(root, ignore_errors=True)


def report(env, cb: CacheBench, n: int, prof, counts, elapsed: float, load_before: str):
    res = cb.res
    big, count, small = cb.big, cb.count, cb.small
    big_label = f"{big / (1 << 30):g} GiB" if big % (1 << 30) == 0 else f"{big >> 20} MiB"
    small_label = f"{count} × {small >> 10} KiB"
    ssh_t = walls(res["ssh_true"])
    tm_t = walls(res["tm_true"])
    ok = True

    def row(label: str, key: str, cold_key: str | None) -> list[str]:
        rs = res[key]
        w = walls(rs)
        vs_cold = f"{walls(res[cold_key]).median / w.median:.1f}× faster" if cold_key else "–"
        return [
            label,
            f"{w.median:.2f} s",
            f"{w.min:.2f}–{w.max:.2f} s",
            vs_cold,
            f"{w.median / ssh_t.median:.1f}×",
            bl.mib(stat_med(rs, "content_bytes_sent")),
            f"{bl.mib(stat_med(rs, 'wire_bytes_sent'))} / "
            f"{bl.mib(stat_med(rs, 'wire_bytes_received'))}",
            f"{stat_sum(rs, 'cache_hits')} / {stat_sum(rs, 'cache_misses')}",
            bl.mib(stat_med(rs, "hashed_bytes")),
            f"{med(rs, lambda r: r.cpu_of(AGENT)):.2f} s",
            f"{med(rs, lambda r: r.cpu_of(CLIENT)):.2f} s",
            f"{med(rs, lambda r: r.hwm_of(AGENT)) / 1024:.0f} MiB",
            str(w.n),
        ]

    header = [
        "run",
        "median wall",
        "min–max",
        "vs its cold run",
        "vs `ssh host true`",
        "content sent",
        "wire up / down",
        "store hits / misses (total)",
        "client hashed",
        "agent CPU",
        "client CPU",
        "agent peak RSS",
        "runs",
    ]
    rows = [
        [
            "`ssh host true`",
            f"{ssh_t.median:.3f} s",
            f"{ssh_t.min:.3f}–{ssh_t.max:.3f} s",
            "–",
            "1.0×",
            "–",
            "–",
            "–",
            "–",
            "–",
            "–",
            "–",
            str(ssh_t.n),
        ],
        [
            "`exec -- true`",
            f"{tm_t.median:.3f} s",
            f"{tm_t.min:.3f}–{tm_t.max:.3f} s",
            "–",
            f"{tm_t.median / ssh_t.median:.1f}×",
            "–",
            "–",
            "–",
            "–",
            f"{med(res['tm_true'], lambda r: r.cpu_of(AGENT)):.2f} s",
            f"{med(res['tm_true'], lambda r: r.cpu_of(CLIENT)):.2f} s",
            f"{med(res['tm_true'], lambda r: r.hwm_of(AGENT)) / 1024:.0f} MiB",
            str(tm_t.n),
        ],
        row(f"{big_label}: cold", "big_cold", None),
        row(f"{big_label}: warm (same inputs, same index)", "big_warm", "big_cold"),
        row(f"{big_label}: store has it, new client index", "big_newidx", "big_cold"),
        row(f"{small_label}: cold", "small_cold", None),
        row(f"{small_label}: warm (same inputs, same index)", "small_warm", "small_cold"),
        row(f"{small_label}: store has it, new client index", "small_newidx", "small_cold"),
    ]

    # Checks: cold must move everything, warm nothing.
    checks = []
    for wl, size in (("big", big), ("small", count * small)):
        bad_cold = [r for r in res[f"{wl}_cold"] if sent(r) != size]
        bad_warm = [r for r in res[f"{wl}_warm"] if sent(r) != 0]
        if bad_cold:
            checks.append(f"{len(bad_cold)} {wl} cold run(s) did not send all content")
        if bad_warm:
            ok = False
            checks.append(
                f"{len(bad_warm)} of {len(res[f'{wl}_warm'])} {wl} warm run(s) sent content "
                f"({', '.join(bl.mib(sent(r)) for r in bad_warm)})"
            )

    bw, bc, bn = (walls(res[f"big_{k}"]).median for k in ("warm", "cold", "newidx"))
    sw, sc, sn = (walls(res[f"small_{k}"]).median for k in ("warm", "cold", "newidx"))
    tmt, ssht = tm_t.median, ssh_t.median
    lines = [
        "<!-- bench:cache:start -->",
        "",
        f"## Cache: cold against warm ({env.date()})",
        "",
        f"Written by `{env.command}` (this section took {elapsed:.0f} s). Same machine, "
        f"test host and snapshot as described in the foundation section: commit "
        f"{env.source_desc}; {env.machine['nproc']} × {env.machine['cpu']}; loopback, so "
        f"no network limits anything here. Load average before / after: {load_before} / "
        f"{bl.loadavg()}.",
        "",
        "### What was measured",
        "",
        f"* **{big_label}**: one file (a 64 MiB urandom block repeated), read whole by "
        f"`exec --stats=json -- sh -c '{BIG_CMD}'`.",
        f"* **{small_label}**: {count} random files in `small/`, read by a batch job that "
        f"names the directory, so the client's manifest lists them: `exec --stats=json -- "
        f"python3 -c '<read every file of argv[1], sorted>' small`.",
        "* **cold**: 16 new random bytes at offset 0 of every input (a content version the "
        "remote store cannot have) and a new, empty client hash index (XDG_CACHE_HOME of "
        "the client); **warm**: the same inputs again with the same index; **store has "
        "it, new client index**: the same inputs again with another new, empty index (a "
        "second client; or the file copied or `touch`ed, which changes its ctime).",
        f"* {n} rounds; each round: `ssh host true`, `exec -- true`, then cold, warm, new "
        f"index of each workload; the round's store objects are deleted after it. Medians "
        f"and min–max over the rounds; ratios are between medians of this run. Wall clock "
        f"from process start to exit, everything included. Sizes and counters come from "
        f"`--stats=json` (content sent = file bytes the client served; wire = every byte "
        f"of the protocol stream, client → remote / remote → client).",
        "* CPU: the client's from `wait4`, the agent's sampled from /proc every 50 ms "
        "(threads included: its store verification and hashing run in worker threads).",
        "",
        "### Results",
        "",
        *bl.md_table(header, rows),
        "",
    ]
    lines += [
        f"Warm over plain ssh: {big_label} **{bw:.2f} s = {bw / ssht:.1f}× `ssh host true`** "
        f"(+{bw - ssht:.2f} s); {small_label} **{sw:.2f} s = {sw / ssht:.1f}×** "
        f"(+{sw - ssht:.2f} s). `exec -- true` alone is {tmt / ssht:.1f}× "
        f"(+{tmt - ssht:.2f} s), so beyond start-up the warm runs spend {bw - tmt:.2f} s "
        f"and {sw - tmt:.2f} s serving the inputs from the store.",
        "",
    ]
    if checks:
        lines += ["Checks that failed: " + "; ".join(checks) + ".", ""]
    else:
        lines += [
            "Checks: every cold run sent all the content, every warm run sent none.",
            "",
        ]
    if counts:
        kinds = sorted({k for c in counts.values() for k in c})
        crow = []
        for key, label in (
            ("big_cold", f"{big_label} cold"),
            ("big_warm", f"{big_label} warm"),
            ("small_cold", f"{small_label} cold"),
            ("small_warm", f"{small_label} warm"),
        ):
            c = counts.get(key, {})
            crow.append([label, *(str(c.get(k, 0)) for k in kinds)])
        lines += [
            "Requests the client served (one more untimed cold and warm run of each "
            "workload, the client wrapped to count them by type): each request the agent "
            "waits for is a round trip on the link.",
            "",
            *bl.md_table(["run", *(f"`{k}`" for k in kinds)], crow),
            "",
        ]
    waited = cb.bench.quiet_waited
    lines += [
        f"Each run started on an idle machine ({waited:.0f} s of waiting in all"
        + (f"; {cb.bench.quiet_missed} run(s) started busy" if cb.bench.quiet_missed else "")
        + f"); {len(cb.bench.discarded)} run(s) disturbed by other load were discarded and "
        f"repeated"
        + (f", {len(cb.bench.disturbed)} kept disturbed" if cb.bench.disturbed else "")
        + ".",
        "",
        "### Interpretation",
        "",
        *interpretation(cb, counts, big_label, small_label, ssht, tmt),
    ]
    if prof:
        lines += ["", "### Profile (py-spy, 100 Hz, one extra warm run of each workload)", ""]
        for wl in ("big", "small"):
            p = prof.get(wl) or {}
            for side in ("agent", "client"):
                if side not in p or p[side]["self"][0] < 20:
                    continue
                total, top = p[side]["self"]
                _, incl = p[side]["inclusive"]
                lines.append(
                    f"{big_label if wl == 'big' else small_label} warm, {side} ({total} "
                    f"samples in {p['wall']:.1f} s; self time, then inclusive):"
                )
                lines.append("")
                lines += [f"* {pct:.0f}% `{frame}`" for pct, frame in top[:6]]
                lines += [
                    f"* inclusive {pct:.0f}% `{frame}`" for pct, frame in bl.interesting(incl)[:6]
                ]
                lines.append("")
    notes = [env.store_note, *cb.notes]
    lines += ["", "Notes:", "", *(f"* {x}" for x in notes), "", "<!-- bench:cache:end -->"]
    md = "\n".join(lines) + "\n"
    table = bl.text_table(header, rows)
    return md, table, ok


def per_file(counts: dict[str, dict[str, int]], key: str, n: int) -> str:
    """Requests per file ('1.00 `OpenRead`'), and totals for the rare kinds."""
    c = counts.get(key, {})
    kinds = ("Stat", "OpenRead", "ReadChunk", "CloseRead", "ListDir")
    each = [f"{c[k] / n:.2f} `{k}`" for k in kinds if c.get(k, 0) >= 0.1 * n]
    rare = [f"{c[k]} `{k}`" for k in kinds if 0 < c.get(k, 0) < 0.1 * n]
    text = ", ".join(each) if each else "no `OpenRead`, `ReadChunk` or `CloseRead`"
    return text + (f" (and {', '.join(rare)} in all)" if rare else "")


def interpretation(cb, counts, big_label, small_label, ssht, tmt) -> list[str]:
    res = cb.res
    out = []
    big, count, small = cb.big, cb.count, cb.small
    bc, bw, bn = (walls(res[f"big_{k}"]).median for k in ("cold", "warm", "newidx"))
    sc, sw, sn = (walls(res[f"small_{k}"]).median for k in ("cold", "warm", "newidx"))

    def cpu(key, label=AGENT):
        return med(res[key], lambda r: r.cpu_of(label))

    hash_s = cb.hash_seconds
    out.append(
        f"* {big_label}: cold {bc:.2f} s ({bl.mbps(big, bc):.0f} MB/s over loopback), warm "
        f"{bw:.2f} s: **{bc / bw:.1f}× faster**, with "
        f"{bl.mib(stat_med(res['big_warm'], 'wire_bytes_sent'))} on the wire instead of "
        f"{bl.mib(stat_med(res['big_cold'], 'wire_bytes_sent'))}. Beyond `exec -- true` the "
        f"warm run still takes {bw - tmt:.2f} s and {cpu('big_warm') - cpu('tm_true'):.2f} "
        f"CPU-s of the agent: the store object is verified (the agent hashes an object the "
        f"first time its process uses it, and every session is a new agent process; blake3 "
        f"of {big_label} from the page cache takes {hash_s:.2f} s here, measured alone with "
        f"the agent's `hash_fd`), then every read of the job crosses FUSE into the agent's "
        f"Python event loop, which answers it from the object file (`--profile` adds a py-spy "
        f"profile of where the agent's time goes)."
    )
    sent_newidx = stat_med(res["big_newidx"], "content_bytes_sent")
    hashed_newidx = stat_med(res["big_newidx"], "hashed_bytes")
    head = (
        f"* {big_label} that the remote store holds but the client's index does not know "
        f"(a second client, or the file copied or `touch`ed): {bn:.2f} s, "
        f"{bl.mib(sent_newidx)} of content sent, {bl.mib(hashed_newidx)} hashed by the "
        f"client (medians)"
    )
    if sent_newidx >= 0.9 * big:
        out.append(
            head + f": the whole content crossed the link again ({bn / bc:.2f}× the cold "
            f"run's time) although the remote had it."
        )
    elif sent_newidx > 0:
        out.append(
            head + f": the transfer started at once and stopped when the client's hash "
            f"showed the remote had the content; {100 * sent_newidx / big:.0f}% of it had "
            f"crossed by then. On a slow link that share is smaller (hashing runs at GB/s), "
            f"here it is the price of not making the job wait for the hash."
        )
    else:
        out.append(head + ": served from the store without sending content.")
    per_ms = (sw - tmt) / count * 1000
    text = (
        f"* {small_label}: cold {sc:.2f} s ({bl.mbps(count * small, sc):.0f} MB/s), warm "
        f"{sw:.2f} s: **{sc / sw:.1f}× faster**. Beyond `exec -- true` the warm run costs "
        f"{per_ms:.1f} ms per file ({cpu('small_warm') - cpu('tm_true'):.2f} CPU-s of the "
        f"agent and {cpu('small_warm', CLIENT) - cpu('tm_true', CLIENT):.2f} of the client "
        f"beyond start-up, i.e. {1000 * (cpu('small_warm') - cpu('tm_true')) / count:.1f} "
        f"and {1000 * (cpu('small_warm', CLIENT) - cpu('tm_true', CLIENT)) / count:.1f} ms "
        f"per file)."
    )
    if counts.get("small_warm"):
        text += (
            f" Requests per file the client served: warm {per_file(counts, 'small_warm', count)}"
            f"; cold {per_file(counts, 'small_cold', count)}. A request the "
            f"agent waits for costs a fraction of a millisecond here, an RTT on a real link "
            f"(see the wan section)."
        )
    text += (
        " The cold run is fast here because nothing limits bandwidth; the warm run's "
        "per-file cost is Python work on both ends (FUSE requests, store opens in a worker "
        "thread, the job's own open/read/close)."
    )
    out.append(text)
    out.append(
        f"* {small_label} with a new client index: {sn:.2f} s, the client hashed "
        f"{bl.mib(stat_med(res['small_newidx'], 'hashed_bytes'))} for the manifest and sent "
        f"{bl.mib(stat_med(res['small_newidx'], 'content_bytes_sent'))}"
        + (
            ": inputs the job names are hashed before it starts, so a second client (or a "
            "touched file) still gets store hits."
            if stat_med(res["small_newidx"], "content_bytes_sent") == 0
            else ": content was sent although the store had it."
        )
    )
    out.append(
        f"* Against plain ssh: `exec -- true` is {tmt / ssht:.1f}× `ssh host true` "
        f"(target ≤ 2×); the warm runs are {bw / ssht:.1f}× ({big_label}) and "
        f"{sw / ssht:.1f}× ({small_label}). Start-up (local and remote Python, the FUSE "
        f"mount, the protocol round trips) is {100 * tmt / sw:.0f}% of the warm "
        f"{small_label} run and {100 * tmt / bw:.0f}% of the warm {big_label} run."
    )
    hwm = max(med(res[k], lambda r: r.hwm_of(AGENT)) for k in res if k != "ssh_true") / 1024
    anon = max(med(res[k], lambda r: r.anon_of(AGENT)) for k in res if k != "ssh_true") / 1024
    out.append(
        f"* Agent peak RSS (VmHWM, the largest median of any kind of run): {hwm:.0f} MiB, of "
        f"which private memory (RssAnon) at most {anon:.0f} MiB; the rest is file pages it "
        f"maps while hashing (target ≤ 150 MB: "
        f"{'met' if hwm * 1.048576 <= 150 else 'missed'})."
    )
    return out
