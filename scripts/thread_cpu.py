#!/usr/bin/env python3
"""Runs a command and reports its CPU time by thread (Linux).

    python3 scripts/thread_cpu.py [--label L] -- tch-vis saliency ...

While the command runs, every thread of its process is sampled from
/proc/PID/task/*/ every 20 ms; the last sample of each thread counts. The
threads are grouped by their name with trailing digits removed (tch-vis
names its own: tch-vis-decode-, tch-vis-write, tch-vis-produce,
tch-vis-collect; the compute thread is the main one, tch-vis), and each
group gets one line:

    thread-cpu L GROUP: N threads, user U s, system S s, waits W voluntary,
        P preempted

`preempted` counts the times a thread was taken off a core while it could
still run (nonvoluntary context switches): many of them in a group whose
CPU time is low says that group waited for cores, not for work. A thread
that lives less than a sample is missed. A last line gives the process's
peaks of resident, locked and pinned memory (VmRSS, VmLck, VmPin: CUDA's
page-locked host memory shows in one of the last two) and its page faults.
With --wchan, each sample also notes where every thread is: running
(R), or the kernel function it sleeps in (from /proc/.../stack where it is
readable, else wchan), and one line per group gives the most frequent
places as shares of that group's samples:

    thread-wait L GROUP: R 41%, S futex_wait_queue 30%, D io_schedule 12%, ...

and a line gives the peaks of the machine's Dirty and Writeback memory
(/proc/meminfo), which say whether writes waited on the disk.
The command's exit status is this script's.
"""

import argparse
import os
import re
import subprocess
import sys
import time


def read(base):
    """The name, the fields after it in `base`/stat, and `base`/status, of a
    process or thread directory under /proc; None once it is gone."""
    try:
        with open(f"{base}/stat") as f:
            stat = f.read()
        with open(f"{base}/status") as f:
            status = f.read()
    except OSError:
        return None
    # The name is in parentheses and may hold spaces.
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    return name, stat[stat.rindex(")") + 2:].split(), status


def counter(status, key):
    """A number of /proc's status text, 0 where it has none."""
    m = re.search(rf"^{key}:\s*(\d+)", status, re.M)
    return int(m.group(1)) if m else 0


def place(base, state):
    """Where a thread of /proc directory `base` is: "R" when running or
    runnable, else its state and the innermost kernel functions it sleeps
    in that are not the scheduler's own."""
    if state == "R":
        return "R"
    try:
        with open(f"{base}/stack") as f:
            frames = [ln.split()[1].split("+")[0] for ln in f if len(ln.split()) > 1]
        frames = [fn for fn in frames if not fn.startswith(("schedule", "__schedule", "do_syscall", "entry_SYSCALL",
                                                            "x64_sys_call", "__x64_sys"))]
        if frames:
            return f"{state} " + "<".join(frames[:3])
    except OSError:
        pass
    try:
        with open(f"{base}/wchan") as f:
            return f"{state} {f.read().strip() or '?'}"
    except OSError:
        return f"{state} ?"


def sample(pid, seen, waits=None):
    """Reads every thread of `pid` into `seen` (tid -> stats); with
    `waits`, counts where each thread is (group -> place -> samples)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        got = read(f"/proc/{pid}/task/{tid}")
        if got is None:
            continue
        name, fields, status = got
        if waits is not None:
            where = place(f"/proc/{pid}/task/{tid}", fields[0])
            g = waits.setdefault(group_of(name), {})
            g[where] = g.get(where, 0) + 1
        seen[tid] = (name, int(fields[11]), int(fields[12]),
                     counter(status, "voluntary_ctxt_switches"),
                     counter(status, "nonvoluntary_ctxt_switches"))


def memory(pid, peaks):
    """Keeps the peaks of the process's VmRSS, VmLck, VmPin (kB) and its
    last fault counts in `peaks`."""
    got = read(f"/proc/{pid}")
    if got is None:
        return
    _, fields, status = got
    for key in ("VmRSS", "VmLck", "VmPin"):
        peaks[key] = max(peaks.get(key, 0), counter(status, key))
    peaks["minflt"], peaks["majflt"] = int(fields[7]), int(fields[9])


def group_of(name):
    """A thread's group: its name without trailing digits."""
    return re.sub(r"[-_]?\d+$", "", name) or name


def meminfo(peaks):
    """Keeps the peaks of the machine's Dirty and Writeback memory (kB)."""
    try:
        with open("/proc/meminfo") as f:
            text = f.read()
    except OSError:
        return
    for key in ("Dirty", "Writeback"):
        peaks[key] = max(peaks.get(key, 0), counter(text, key))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="run")
    parser.add_argument("--every", type=float, default=0.02, help="seconds between samples")
    parser.add_argument("--wchan", action="store_true", help="also sample where each thread waits")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command")
    tick = os.sysconf("SC_CLK_TCK")
    proc = subprocess.Popen(command)
    seen, peaks = {}, {}
    waits = {} if args.wchan else None
    while proc.poll() is None:
        sample(proc.pid, seen, waits)
        memory(proc.pid, peaks)
        if waits is not None:
            meminfo(peaks)
        time.sleep(args.every)
    groups = {}
    for name, utime, stime, vol, inv in seen.values():
        key = group_of(name)
        g = groups.setdefault(key, [0, 0, 0, 0, 0])
        g[0] += 1
        g[1] += utime
        g[2] += stime
        g[3] += vol
        g[4] += inv
    for key, (n, utime, stime, vol, inv) in sorted(groups.items(), key=lambda kv: -(kv[1][1] + kv[1][2])):
        print(f"thread-cpu {args.label} {key}: {n} threads, user {utime / tick:.2f} s, "
              f"system {stime / tick:.2f} s, waits {vol} voluntary, {inv} preempted", flush=True)
    mib = {k: peaks.get(k, 0) / 1024 for k in ("VmRSS", "VmLck", "VmPin")}
    print(f"thread-cpu {args.label} process: peak VmRSS {mib['VmRSS']:.0f} MiB, VmLck {mib['VmLck']:.0f} MiB, "
          f"VmPin {mib['VmPin']:.0f} MiB; {peaks.get('minflt', 0)} minor, {peaks.get('majflt', 0)} major page faults",
          flush=True)
    for key, places in sorted((waits or {}).items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(places.values())
        top = sorted(places.items(), key=lambda kv: -kv[1])[:6]
        print(f"thread-wait {args.label} {key}: " + ", ".join(f"{w} {100 * c / total:.0f}%" for w, c in top),
              flush=True)
    if waits is not None:
        print(f"thread-wait {args.label} machine: peak Dirty {peaks.get('Dirty', 0) / 1024:.0f} MiB, "
              f"Writeback {peaks.get('Writeback', 0) / 1024:.0f} MiB", flush=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
