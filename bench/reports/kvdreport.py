"""kvdreport.py - what every benchmark report in bench/reports shares.

Each report script measures with the real programs (build/server/kvd, build/bench/kvd-bench,
build/tools/kvd-gen, build/bench/bench_kv), writes the raw figures as JSON into
bench/results/, then renders a Markdown table (bench/results/<report>.md, pasted into
docs/benchmarks.md) and a PNG (docs/serving_<report>.png, drawn by gnuplot) from that
JSON alone, so `--render-only` redraws without measuring again. Only the standard library
is needed (numpy for the curve fit of one report), because the `python3` first on PATH
may not be Debian's; the scripts run as /usr/bin/python3.

The machine is shared while measuring, so every result records the load average before,
during (the highest 1-minute figure a sampler saw) and after, and heavy programs run
under `nice -n 5`. A daemon is started with --port 0 and read from its banner; it is
always stopped (SIGINT, then SIGKILL after a grace period) when a report ends or fails.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NICE = ["nice", "-n", "5"]
BANNER_TIMEOUT_S = 300


def fail(message):
    print("%s: %s" % (os.path.basename(sys.argv[0]), message), file=sys.stderr)
    sys.exit(1)


def common_args(description, default_model="models/bench-0.5b"):
    """The flags every report takes; paths are relative to the source root."""
    # A report stopped with SIGTERM still stops its daemon (the `with` blocks unwind).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--build", default=os.environ.get("KVD_BUILD", "build"),
                   help="meson build directory with the programs (default $KVD_BUILD or build)")
    p.add_argument("--model", default=default_model, help="checkpoint directory")
    p.add_argument("--threads", type=int, default=2, help="compute threads of kvd / kvd-gen")
    p.add_argument("--results", default="bench/results", help="where the JSON and tables go")
    p.add_argument("--docs", default="docs", help="where the PNG goes")
    p.add_argument("--render-only", action="store_true",
                   help="do not measure: redraw the table and plot from the existing JSON")
    p.add_argument("--quick", action="store_true",
                   help="a short smoke run (few requests) to check the script itself; "
                        "its figures are not the report's")
    return p


def path(rel):
    return rel if os.path.isabs(rel) else os.path.join(SOURCE_ROOT, rel)


def program(args, rel):
    exe = os.path.join(path(args.build), rel)
    if not os.access(exe, os.X_OK):
        fail("%s is missing: build it first (ninja -C %s %s)" % (exe, args.build, rel))
    return exe


def ensure_model(args):
    """Makes the qwen2.5-0.5b preset checkpoint when the default model dir is absent.
    A GGUF file (kvd-quantize's) is taken as it is."""
    model = path(args.model)
    if os.path.isfile(os.path.join(model, "config.json")) or \
            (os.path.isfile(model) and model.endswith(".gguf")):
        return model
    if os.path.normpath(args.model) != os.path.normpath("models/bench-0.5b"):
        fail("%s: no config.json (only models/bench-0.5b is made on demand)" % model)
    tokenizer = path("third_party/qwen-tokenizer/tokenizer.json")
    if not os.path.isfile(tokenizer):
        fail("%s is missing: run scripts/fetch-tokenizer.sh" % tokenizer)
    cmd = [program(args, "tools/kvd-mkmodel"), "--preset", "qwen2.5-0.5b", "--out", model,
           "--tokenizer", tokenizer]
    print("+ " + " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    return model


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def machine():
    cpu = "unknown"
    flags = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    os_name = platform.platform()
    try:
        with open("/etc/os-release") as f:
            m = re.search(r'^PRETTY_NAME="([^"]*)"', f.read(), re.M)
            os_name = m.group(1) if m else os_name
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "avx512f": " avx512f" in flags, "os": os_name,
            "kernel": platform.release(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def command_line():
    """The command that reproduces this run, from the source root."""
    return "/usr/bin/python3 " + " ".join(shlex.quote(a) for a in
                                          [os.path.relpath(os.path.abspath(sys.argv[0]), SOURCE_ROOT)]
                                          + sys.argv[1:])


def results_file(args, name):
    d = path(args.results)
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, name)


def write_json(file, data):
    with open(file + ".tmp", "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(file + ".tmp", file)
    print("wrote %s" % os.path.relpath(file, SOURCE_ROOT), file=sys.stderr)


def read_json(file):
    try:
        with open(file) as f:
            return json.load(f)
    except OSError as e:
        fail("%s: %s (measure first: run without --render-only)" % (file, e.strerror))


def write_text(file, text):
    with open(file, "w") as f:
        f.write(text)
    print("wrote %s" % os.path.relpath(file, SOURCE_ROOT), file=sys.stderr)


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines) + "\n"


def gnuplot(script, data_files):
    """Runs a gnuplot script; data_files maps a name used in the script ($name) to rows."""
    with tempfile.TemporaryDirectory(prefix="kvd-report-") as tmp:
        # Longest names first, so $run does not replace the start of $runs.
        for name, rows in sorted(data_files.items(), key=lambda kv: -len(kv[0])):
            file = os.path.join(tmp, name + ".dat")
            with open(file, "w") as f:
                for r in rows:
                    f.write(" ".join(str(c) for c in r) + "\n")
            script = script.replace("$" + name, "'" + file + "'")
        subprocess.run(["gnuplot"], input=script, text=True, check=True)


def png_header(out, width=960, height=560):
    return ("set terminal pngcairo size %d,%d font 'DejaVu Sans,11' noenhanced\n"
            "set output '%s'\nset grid\n" % (width, height, out))


def stats_of(values):
    """Median and p99 with numpy's linear interpolation (as kvd-bench)."""
    v = sorted(values)
    if not v:
        return {"median": None, "p99": None}

    def pct(p):
        pos = (len(v) - 1) * p / 100.0
        lo = int(pos)
        hi = min(lo + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (pos - lo)
    return {"median": pct(50), "p99": pct(99)}


class Daemon:
    """build/server/kvd on a free loopback port; `with Daemon(...) as d:` stops it."""

    def __init__(self, args, model, extra, log_file):
        self.cmd = NICE + [program(args, "server/kvd"), "--model", model, "--port", "0",
                           "--threads", str(args.threads)] + extra
        self.log_file = log_file
        self.proc = None
        self.url = None
        self.banner = {}
        self.load_peak = {}

    def __enter__(self):
        print("+ " + " ".join(self.cmd), file=sys.stderr)
        self.log = open(self.log_file, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + BANNER_TIMEOUT_S
        while time.monotonic() < deadline:
            # Loading is when the resident set peaks (see memory.py): keep its largest parts.
            for k, v in proc_status(self.proc.pid).items():
                self.load_peak[k] = max(self.load_peak.get(k, 0), v)
            text = open(self.log_file).read()
            m = re.search(r"kvd: listening on (http://\S+)", text)
            if m:
                self.url = m.group(1)
                self.banner = parse_banner(text)
                return self
            if self.proc.poll() is not None:
                self.log.close()
                fail("kvd exited (%d) before its banner:\n%s" % (self.proc.returncode, text))
            time.sleep(0.2)
        self.stop()
        fail("kvd printed no banner within %d s" % BANNER_TIMEOUT_S)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.log.close()

    def __exit__(self, *exc):
        self.stop()

    def metrics(self):
        return fetch_metrics(self.url)

    def request_log(self):
        """Per-request lines of the daemon's log (the prefix cache's cached_tokens is there)."""
        rows = []
        pattern = re.compile(r"kvd: request \S+ POST (\S+) 200 prompt_tokens=(\d+) cached_tokens=(\d+) "
                             r"completion_tokens=(\d+)")
        with open(self.log_file) as f:
            for line in f:
                m = pattern.search(line)
                if m:
                    rows.append({"path": m.group(1), "prompt_tokens": int(m.group(2)),
                                 "cached_tokens": int(m.group(3)),
                                 "completion_tokens": int(m.group(4))})
        return rows


def parse_banner(text):
    b = {}
    m = re.search(r"(\d+) bytes of weights", text)
    if m:
        b["weights_bytes"] = int(m.group(1))
    m = re.search(r"KV pool: (\d+) blocks of (\d+) tokens, (\d+) bytes \((\d+) per block", text)
    if m:
        b.update(kv_blocks=int(m.group(1)), block_size=int(m.group(2)), kv_pool_bytes=int(m.group(3)),
                 kv_block_bytes=int(m.group(4)))
    m = re.search(r"context (\d+)", text)
    if m:
        b["context"] = int(m.group(1))
    m = re.search(r"prefix cache (on|off)", text)
    if m:
        b["prefix_cache"] = m.group(1) == "on"
    m = re.search(r"max_num_seqs (\d+), max_batched_tokens (\d+)", text)
    if m:
        b.update(max_num_seqs=int(m.group(1)), max_batched_tokens=int(m.group(2)))
    return b


def fetch_metrics(url):
    """The page's samples without labels (labelled ones keyed with their labels)."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


def proc_status(pid):
    out = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                k, _, v = line.partition(":")
                if k.startswith("Vm") or k.startswith("Rss"):
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


class Sampler:
    """Polls /metrics and /proc/PID/status every `interval` seconds on a thread while a load
    runs, keeping the peaks and a thin time series (the engine's view of the run)."""

    GAUGES = ["kvd:num_requests_running", "kvd:num_requests_waiting", "kvd:kv_blocks_used",
              "kvd:kv_cache_usage_perc"]

    def __init__(self, daemon, interval=0.1):
        self.daemon = daemon
        self.interval = interval
        self.series = []
        self.peak = {}
        self.max_load1 = 0.0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        t0 = time.monotonic()
        while not self.stop_event.is_set():
            try:
                m = self.daemon.metrics()
            except OSError:
                m = {}
            st = proc_status(self.daemon.proc.pid)
            row = {"t": round(time.monotonic() - t0, 3)}
            for g in self.GAUGES:
                if g in m:
                    row[g.split(":")[1]] = m[g]
            for k in ("VmRSS", "VmHWM"):
                if k in st:
                    row[k + "_kb"] = st[k]
            self.series.append(row)
            for k, v in row.items():
                if k != "t":
                    self.peak[k] = max(self.peak.get(k, v), v)
            self.max_load1 = max(self.max_load1, loadavg()[0])
            self.stop_event.wait(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join()

    def mean(self, key, skip_zero_tail=True):
        """Time average of a gauge over the samples while the load ran (from the first
        nonzero sample to the last one, so start-up and drain idle time do not count)."""
        vals = [r.get(key, 0) for r in self.series]
        nz = [i for i, v in enumerate(vals) if v > 0]
        if not nz:
            return 0.0
        vals = vals[nz[0]:nz[-1] + 1] if skip_zero_tail else vals
        return sum(vals) / len(vals)


def run_kvd_bench(args, url, flags, json_out):
    """Runs kvd-bench once; returns its JSON without the pooled ITL list (large, unused)."""
    cmd = NICE + [program(args, "bench/kvd-bench"), "--url", url, "--no-progress",
                  "--json", json_out] + flags
    print("+ " + " ".join(cmd[3:]), file=sys.stderr)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if r.returncode not in (0, 1):
        fail("kvd-bench failed (%d):\n%s" % (r.returncode, r.stdout))
    with open(json_out) as f:
        data = json.load(f)
    data.pop("itls", None)
    data["kvd_bench_command"] = "kvd-bench --url URL " + " ".join(flags)
    return data


def fmt(x, digits=1):
    if x is None:
        return "-"
    return ("%." + str(digits) + "f") % x
