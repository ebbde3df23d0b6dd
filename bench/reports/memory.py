#!/usr/bin/python3
"""memory.py - report 5: resident memory of the daemon versus its weights and KV pool.

The daemon (default configuration but --threads) is measured idle after its banner and
again after a load (kvd-bench, 16 clients, 128-token prompts, 128 output tokens), with the
peak VmRSS sampled during the load. VmRSS/VmHWM come from /proc/PID/status; each mapping
of /proc/PID/smaps is classified to account for every resident byte: the weights arena
(the anonymous mapping the size of the banner's weights), the KV pool (the one the size of
its pool bytes; only pages of blocks ever used are resident), malloc heaps (glibc's main
heap and its per-thread arenas), thread stacks, and the program and libraries. Overhead =
RSS - resident weights - resident KV pool. When heaptrack is installed a third daemon run
under it names the allocation sites of the heap (peak bytes per function); while the daemon
loads, the polls of the banner wait record the largest RssAnon and RssFile, which explain
VmHWM.

Writes bench/results/memory.json, bench/results/memory.md, docs/serving_memory.png.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kvdreport as R  # noqa: E402

MIB = 1024 * 1024


def classify_smaps(pid, banner):
    """Resident kB per kind of mapping, and the largest mappings."""
    kinds = {"weights": 0, "kv_pool": 0, "heap": 0, "stacks": 0, "program_and_libraries": 0, "other": 0}
    biggest = []
    weights, pool = banner.get("weights_bytes", 0), banner.get("kv_pool_bytes", 0)
    with open("/proc/%d/smaps" % pid) as f:
        text = f.read()
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
        head = block.split("\n", 1)[0].split()
        start, end = (int(x, 16) for x in head[0].split("-"))
        size, perms, name = end - start, head[1], head[5] if len(head) > 5 else ""
        rss = int(re.search(r"^Rss:\s+(\d+)", block, re.M).group(1))
        # The loader's arena and the pool are rounded up to pages (2 MiB for huge pages).
        if not name and weights and weights <= size <= weights + 4 * MIB:
            kind = "weights"
        elif not name and pool and pool <= size <= pool + 4 * MIB:
            kind = "kv_pool"
        elif name == "[heap]" or (not name and "rw" in perms and size <= 64 * MIB + 4096 and rss > 0
                                  and size > 1 * MIB):
            kind = "heap"
        elif name.startswith("[stack") or (not name and size <= 8 * MIB + 8192 and "rw" in perms):
            kind = "stacks"
        elif name.startswith("/"):
            kind = "program_and_libraries"
        else:
            kind = "other"
        kinds[kind] += rss
        biggest.append({"kB": rss, "size_kB": size // 1024, "perms": perms, "name": name or "[anon]",
                        "kind": kind})
    biggest.sort(key=lambda m: -m["kB"])
    return kinds, biggest[:8]


def snapshot(pid, banner):
    st = R.proc_status(pid)
    kinds, biggest = classify_smaps(pid, banner)
    overhead = st["VmRSS"] - kinds["weights"] - kinds["kv_pool"]
    return {"VmRSS_kB": st["VmRSS"], "VmHWM_kB": st["VmHWM"], "RssAnon_kB": st.get("RssAnon"),
            "RssFile_kB": st.get("RssFile"), "by_kind_kB": kinds, "overhead_kB": overhead,
            "largest_mappings": biggest}


def heaptrack_sites(args, model, tmp):
    """Peak heap bytes per allocating function of an idle daemon, from heaptrack."""
    if not shutil.which("heaptrack") or not shutil.which("heaptrack_print"):
        return None
    out = os.path.join(tmp, "heap")
    log = os.path.join(tmp, "heaptrack.log")
    cmd = R.NICE + ["heaptrack", "-o", out, R.program(args, "server/kvd"), "--model", model,
                    "--port", "0", "--threads", str(args.threads)]
    print("+ " + " ".join(cmd), file=sys.stderr)
    with open(log, "w") as lf:
        wrapper = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + R.BANNER_TIMEOUT_S
        while "kvd: listening on" not in open(log).read():
            if wrapper.poll() is not None or time.monotonic() > deadline:
                wrapper.kill()
                return None
            time.sleep(0.2)
        time.sleep(1)
        # heaptrack is a shell script waiting for kvd: signal kvd itself, its only child.
        with open("/proc/%d/task/%d/children" % (wrapper.pid, wrapper.pid)) as f:
            for child in f.read().split():
                os.kill(int(child), 2)
        wrapper.wait(timeout=120)
    data = [f for f in os.listdir(tmp) if f.startswith("heap")]
    if not data:
        return None
    text = subprocess.run(["heaptrack_print", "-f", os.path.join(tmp, data[0]), "-p", "1", "-a", "0",
                           "-T", "0", "-n", "14", "-s", "0"], stdout=subprocess.PIPE, text=True).stdout
    sites = []
    for m in re.finditer(r"^([\d.]+)([KMG]?)B? peak memory consumed over (\d+) calls from\n(\S+)", text, re.M):
        scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]
        sites.append({"function": m.group(4), "peak_bytes": int(float(m.group(1)) * scale),
                      "calls": int(m.group(3))})
    m = re.search(r"peak heap memory consumption: ([\d.]+)([KMG]?)", text)
    peak = int(float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]) if m else None
    return {"peak_heap_bytes": peak, "sites": sites,
            "command": "heaptrack build/server/kvd --model %s --threads %d (idle, then SIGINT); "
                       "heaptrack_print -p 1" % (args.model, args.threads)}


def malloc_trim(pid):
    """Asks glibc in the running daemon (through gdb) to give back every free page of every
    arena: the drop in RSS is heap memory freed but kept by malloc. False without gdb."""
    if not shutil.which("gdb"):
        return False
    r = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "call (int) malloc_trim(0)"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    return "$1 = 1" in r.stdout or "$1 = 0" in r.stdout


def measure(args):
    model = R.ensure_model(args)
    flags = ["--concurrency", "16", "--requests", "16" if args.quick else "32", "--prompt-tokens", "128",
             "--max-tokens", "128", "--ignore-eos", "--seed", "500", "--timeout", "1800"]
    result = {"report": "memory", "command": R.command_line(), "machine": R.machine(),
              "load1_start": R.loadavg(), "model": args.model, "threads": args.threads,
              "kvd_bench_flags": " ".join(flags)}
    with tempfile.TemporaryDirectory(prefix="kvd-report-") as tmp:
        with R.Daemon(args, model, [], os.path.join(tmp, "kvd.log")) as d:
            time.sleep(2)
            result["banner"] = d.banner
            result["while_loading_peak_kB"] = {k: d.load_peak.get(k) for k in ("VmRSS", "RssAnon", "RssFile")}
            result["idle"] = snapshot(d.proc.pid, d.banner)
            with R.Sampler(d, 0.2) as s:
                bench = R.run_kvd_bench(args, d.url, flags, os.path.join(tmp, "load.json"))
            result["under_load_peak_VmRSS_kB"] = s.peak.get("VmRSS_kb")
            result["under_load_peak_kv_blocks_used"] = s.peak.get("kv_blocks_used")
            result["after_load"] = snapshot(d.proc.pid, d.banner)
            result["load1_max"] = s.max_load1
            result["kvd_bench"] = {k: v for k, v in bench.items() if not isinstance(v, list)}
            result["after_load_malloc_trim"] = (snapshot(d.proc.pid, d.banner)
                                                if malloc_trim(d.proc.pid) else None)
        # A second daemon, never loaded: what of its idle heap is free memory malloc keeps.
        with R.Daemon(args, model, [], os.path.join(tmp, "kvd-trim.log")) as d:
            time.sleep(2)
            result["idle_again"] = snapshot(d.proc.pid, d.banner)
            result["idle_malloc_trim"] = snapshot(d.proc.pid, d.banner) if malloc_trim(d.proc.pid) else None
        result["heaptrack"] = heaptrack_sites(args, model, tmp)
    result["load1_end"] = R.loadavg()
    R.write_json(R.results_file(args, "memory.json"), result)


def render(args):
    res = R.read_json(R.results_file(args, "memory.json"))
    b = res["banner"]
    mib = lambda kb: kb / 1024.0  # noqa: E731
    states = [("idle, after the banner", res["idle"]), ("after the load", res["after_load"]),
              ("after the load, then malloc_trim(0)", res.get("after_load_malloc_trim")),
              ("idle (second daemon)", res.get("idle_again")),
              ("idle (second daemon), then malloc_trim(0)", res.get("idle_malloc_trim"))]
    states = [(label, snap) for label, snap in states if snap]
    rows = []
    for label, snap in states:
        k = snap["by_kind_kB"]
        rows.append([label, R.fmt(mib(snap["VmRSS_kB"])), R.fmt(mib(k["weights"])), R.fmt(mib(k["kv_pool"])),
                     R.fmt(mib(k["heap"])), R.fmt(mib(k["stacks"] + k["program_and_libraries"] + k["other"])),
                     R.fmt(mib(snap["overhead_kB"]))])
    md = ["Weights %d bytes (%.1f MiB), KV pool %d bytes (%.1f MiB) from the banner. MiB resident "
          "(VmRSS split by mapping from /proc/PID/smaps):\n" % (
              b["weights_bytes"], b["weights_bytes"] / MIB, b["kv_pool_bytes"], b["kv_pool_bytes"] / MIB),
          R.md_table(["state", "VmRSS", "weights", "KV pool", "malloc heaps", "stacks, program, libs",
                      "overhead (RSS - weights - KV)"], rows),
          "VmHWM %.1f MiB. While loading (polled every 0.2 s): RssAnon up to %.1f MiB, RssFile up to "
          "%.1f MiB. Peak VmRSS sampled during the load: %.1f MiB (peak kvd:kv_blocks_used %g of %d; "
          "kvd-bench %s).\n" % (
              mib(res["idle"]["VmHWM_kB"]), mib(res["while_loading_peak_kB"]["RssAnon"] or 0),
              mib(res["while_loading_peak_kB"]["RssFile"] or 0), mib(res["under_load_peak_VmRSS_kB"]),
              res["under_load_peak_kv_blocks_used"], b["kv_blocks"], res["kvd_bench_flags"])]
    ht = res.get("heaptrack")
    if ht:
        md.append("heaptrack, idle daemon: peak heap %.1f MiB allocated; largest allocation sites (MiB "
                  "allocated at the peak; a large buffer is resident only once its pages are written):\n" % (
                      ht["peak_heap_bytes"] / MIB))
        md.append(R.md_table(["function", "MiB at peak", "calls"],
                             [[s["function"], R.fmt(s["peak_bytes"] / MIB, 2), s["calls"]]
                              for s in ht["sites"] if s["peak_bytes"] >= 256 * 1024]))
    R.write_text(R.results_file(args, "memory.md"), "\n".join(md))

    out = os.path.join(R.path(args.docs), "serving_memory.png")
    short = {"idle, after the banner": "idle", "after the load": "after load",
             "after the load, then malloc_trim(0)": "after load\\n+ malloc_trim",
             "idle (second daemon)": "idle (2nd)",
             "idle (second daemon), then malloc_trim(0)": "idle (2nd)\\n+ malloc_trim"}
    data = {"mem": [], "parts": []}
    for label, snap in states:
        k = snap["by_kind_kB"]
        data["mem"].append(['"%s"' % short[label], "%.2f" % mib(k["kv_pool"]), "%.2f" % mib(k["heap"]),
                            "%.2f" % mib(k["stacks"] + k["program_and_libraries"] + k["other"]),
                            "%.2f" % mib(snap["overhead_kB"])])
    script = R.png_header(out, 1000, 560) + """
set title "kvd on %s: resident memory besides weights (%.0f MiB) and KV pool (%.0f MiB, touched pages)"
set bmargin 4
set style data histograms
set style histogram rowstacked
set style fill solid 0.85 border -1
set boxwidth 0.55
set ylabel 'overhead: MiB resident beyond weights and KV pool'
set yrange [0:*]
set key top right
plot $mem using 3:xtic(1) lc rgb '#d9534f' title 'malloc heaps', \\
     '' using 4 lc rgb '#999999' title 'stacks, program, libraries', \\
     64 with lines dt 2 lw 2 lc rgb '#000000' title 'overhead target: 64 MiB'
""" % (os.path.basename(res["model"]), b["weights_bytes"] / MIB, b["kv_pool_bytes"] / MIB)
    R.gnuplot(script, data)
    print("wrote %s" % os.path.relpath(out, R.SOURCE_ROOT), file=sys.stderr)


def main():
    args = R.common_args(__doc__.splitlines()[0]).parse_args()
    if not args.render_only:
        measure(args)
    render(args)


if __name__ == "__main__":
    main()
