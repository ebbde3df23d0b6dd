"""test_cluster.py - kvd replicas behind HAProxy with configs/haproxy.cfg, on loopback.

Three replicas of the tiny model behind Debian's haproxy, the balancer's config taken
from configs/haproxy.cfg with only its `server` lines (and, for the comparison, its
`balance` line) replaced, as scripts/cluster.sh does. Checks the deployment contract of
docs/deploy.md:
- affinity: kvd-bench's multi-turn chat (24 sessions x 5 turns, one X-Session-ID each)
  through the balancer reuses the prefix cache at >= 90% of the rate one replica gets on
  the same workload alone; round-robin is measured beside it (printed, and lower);
- the key without a header: the first user message keeps a conversation on one replica;
- losing a replica (SIGKILL): sessions on the others never move, the lost replica's
  sessions move and continue, and a stream in flight on it ends promptly (no hang);
- draining a replica (SIGTERM): no client sees a failure, new work goes elsewhere;
- X-Request-ID: the balancer's id reaches the replica's log and comes back;
- the Prometheus scrape config passes `promtool check config` and the affinity recording
  rules compute what they say (`promtool test rules`).
Exits 77 (skipped) when haproxy is not installed.
"""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvd_e2e import BUILD_ROOT, SOURCE_ROOT, Daemon, parse_metrics, run_tests, wait_until  # noqa: E402
from kvd_lines import LineLog, die_with_parent  # noqa: E402

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
KVD_BENCH = os.path.join(BUILD_ROOT, "bench", "kvd-bench")
CONFIG = os.path.join(SOURCE_ROOT, "configs", "haproxy.cfg")
REPLICA_ARGS = ("--kv-dtype", "f32", "--served-model-name", "tiny")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Balancer(LineLog):
    """haproxy with configs/haproxy.cfg in front of the given replica ports."""

    def __init__(self, ports, balance=None):
        LineLog.__init__(self)
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="kvd-lb-")
        lines = []
        with open(CONFIG) as f:
            for line in f:
                if line.startswith("    server kvd"):
                    continue
                if balance and line.strip().startswith("balance "):
                    line = "    balance %s\n" % balance
                lines.append(line)
        lines += ["    server kvd%d 127.0.0.1:%d\n" % (i + 1, p) for i, p in enumerate(ports)]
        self.cfg = os.path.join(self.dir, "haproxy.cfg")
        with open(self.cfg, "w") as f:
            f.writelines(lines)

    def __enter__(self):
        env = dict(os.environ, KVD_LB_BIND="127.0.0.1:%d" % self.port)
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", self.cfg], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent)
        self.follow_output()
        wait_until(self._accepts, 10, "haproxy to accept connections")
        return self

    def __exit__(self, *exc):
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
        return False

    def _accepts(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def chat(self, messages, session=None, max_tokens=4, headers=None, timeout=30):
        """One chat turn; returns (status, response headers, parsed body or None)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            hdrs = {"Content-Type": "application/json"}
            if session:
                hdrs["X-Session-ID"] = session
            hdrs.update(headers or {})
            body = {"model": "tiny", "messages": messages, "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True}
            c.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(), headers=hdrs)
            r = c.getresponse()
            data = r.read()
            head = {k.lower(): v for k, v in r.getheaders()}
            return r.status, head, json.loads(data) if data else None
        finally:
            c.close()


def replicas(n):
    return [Daemon(*REPLICA_ARGS) for _ in range(n)]


class Started:
    """Starts several context managers; exits them all, in reverse, whatever happens."""

    def __init__(self, items):
        self.items = items

    def __enter__(self):
        done = []
        try:
            for item in self.items:
                item.__enter__()
                done.append(item)
        except BaseException:
            for item in reversed(done):
                item.__exit__(None, None, None)
            raise
        return self.items

    def __exit__(self, *exc):
        for item in reversed(self.items):
            item.__exit__(None, None, None)
        return False


def prefix_counts(daemons):
    hits = queries = 0
    for d in daemons:
        m = d.metrics()
        hits += m["kvd:prefix_cache_hits_total"]
        queries += m["kvd:prefix_cache_queries_total"]
    return hits, queries


def bench(port, *extra):
    """kvd-bench's multi-turn chat workload against 127.0.0.1:port; returns its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        cmd = [KVD_BENCH, "--url", "http://127.0.0.1:%d" % port, "--model", "tiny", "--turns", "5",
               "--requests", "120", "--concurrency", "6", "--prompt-tokens", "24", "--max-tokens", "8",
               "--ignore-eos", "--seed", "3", "--json", out, "--no-progress", *extra]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, "kvd-bench failed:\n" + p.stdout + p.stderr
        with open(out) as f:
            result = json.load(f)
    assert result["completed"] == 120 and result["failed"] == 0, result
    return result


def hit_rate(daemons, port, *extra):
    before = prefix_counts(daemons)
    result = bench(port, *extra)
    hits, queries = (a - b for a, b in zip(prefix_counts(daemons), before))
    return hits / queries, result


def test_affinity_keeps_the_prefix_cache_hit_rate():
    with Daemon(*REPLICA_ARGS) as single:
        alone, one = hit_rate([single], single.port)
    with Started(replicas(3)) as ds:
        with Balancer([d.port for d in ds]) as lb:
            affinity, three = hit_rate(ds, lb.port, "--session-header")
    # Fresh replicas: the affinity run's conversations (same seed, same answers) would still sit
    # in the prefix caches and hand round-robin hits it did not earn.
    with Started(replicas(3)) as ds:
        with Balancer([d.port for d in ds], balance="roundrobin") as lb:
            round_robin, _ = hit_rate(ds, lb.port, "--session-header")
    print("prefix-cache hit rate: one replica %.4f, 3 behind HAProxy with affinity %.4f (%.1f%%), "
          "round-robin %.4f (%.1f%%); output tokens/s: 1 replica %.1f, 3 replicas %.1f"
          % (alone, affinity, 100 * affinity / alone, round_robin, 100 * round_robin / alone,
             one["output_throughput"], three["output_throughput"]), flush=True)
    assert affinity >= 0.9 * alone, (affinity, alone)
    assert round_robin < affinity, (round_robin, affinity)


def converse(lb, session, first_words, turns, replicas_seen, errors, headers=None):
    """One conversation of `turns` turns; records the replica of each turn."""
    messages = [{"role": "system", "content": "You are a test."},
                {"role": "user", "content": first_words}]
    for turn in range(turns):
        status, head, body = lb.chat(messages, session=session, headers=headers)
        if status != 200:
            errors.append((session or first_words, turn, status, body))
            return
        replicas_seen.append(head.get("x-kvd-replica"))
        messages.append(body["choices"][0]["message"])
        messages.append({"role": "user", "content": "and then %d?" % turn})


def test_first_user_message_is_the_key_without_a_header():
    with Started(replicas(3)) as ds:
        with Balancer([d.port for d in ds]) as lb:
            seen_by = {}
            for i in range(12):
                seen, errors = [], []
                converse(lb, None, "conversation number %d opens here" % i, 3, seen, errors)
                assert not errors, errors
                assert len(set(seen)) == 1, seen  # every turn on one replica
                seen_by[i] = seen[0]
            assert len(set(seen_by.values())) >= 2, seen_by  # and the conversations spread


def test_losing_a_replica_moves_only_its_sessions():
    with Started(replicas(3)) as ds:
        with Balancer([d.port for d in ds]) as lb:
            sessions = ["s%d" % i for i in range(18)]
            first = {}
            for s in sessions:
                seen, errors = [], []
                converse(lb, s, "hello from " + s, 1, seen, errors)
                assert not errors, errors
                first[s] = seen[0]
            victim_name = max(set(first.values()), key=list(first.values()).count)
            victim = ds[int(victim_name[3:]) - 1]
            # A long stream in flight on the victim when it dies must end, not hang.
            victim_session = next(s for s in sessions if first[s] == victim_name)
            outcome = {}

            def stream():
                c = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=30)
                t0 = time.monotonic()
                try:
                    c.request("POST", "/v1/chat/completions", headers={
                        "Content-Type": "application/json", "X-Session-ID": victim_session},
                        body=json.dumps({"model": "tiny", "stream": True, "max_tokens": 4000,
                                         "ignore_eos": True,
                                         "messages": [{"role": "user", "content": "long"}]}).encode())
                    r = c.getresponse()
                    outcome["status"] = r.status
                    outcome["body"] = r.read()
                except (OSError, http.client.HTTPException) as e:
                    outcome["error"] = repr(e)
                outcome["seconds"] = time.monotonic() - t0

            t = threading.Thread(target=stream)
            t.start()
            wait_until(lambda: victim.metrics().get("kvd:num_requests_running", 0) >= 1, 20,
                       "the long stream to run on " + victim_name)
            victim.proc.send_signal(signal.SIGKILL)
            t.join(30)
            assert not t.is_alive(), "the stream on the killed replica hangs"
            assert b"[DONE]" not in outcome.get("body", b""), "a killed stream cannot complete"
            # Until a health check has marked the victim down, a request hashed to it is
            # redispatched to any replica, not yet to the one its sessions move to.
            lb.wait_for_line(r"\b%s is DOWN" % victim_name, 10)
            # Every session continues; only the victim's sessions move.
            for s in sessions:
                seen, errors = [], []
                converse(lb, s, "hello from " + s, 2, seen, errors)
                assert not errors, errors
                if first[s] != victim_name:
                    assert set(seen) == {first[s]}, (s, first[s], seen)
                else:
                    assert victim_name not in seen and len(set(seen)) == 1, (s, seen)


def test_draining_replica_loses_no_request():
    with Started(replicas(3)) as ds:
        with Balancer([d.port for d in ds]) as lb:
            stop = threading.Event()
            errors, served = [], []

            def client(i):
                while not stop.is_set():
                    converse(lb, "drain-%d-%d" % (i, len(served)), "hi %d" % i, 2, served, errors)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            target = ds[1]
            before = len(served)
            target.signal(signal.SIGTERM)
            assert target.wait_exit(60) == 0
            time.sleep(1.0)
            stop.set()
            for t in threads:
                t.join(60)
            assert not errors, errors[:5]
            assert len(served) > before + 6, (before, len(served))
            assert "kvd2" not in served[-6:], served[-12:]


def test_request_id_reaches_the_replica_log():
    with Started(replicas(1)) as ds:
        with Balancer([d.port for d in ds]) as lb:
            messages = [{"role": "user", "content": "trace me"}]
            status, head, _ = lb.chat(messages, headers={"X-Request-ID": "trace-4711"})
            assert status == 200 and head.get("x-request-id") == "trace-4711", head
            ds[0].wait_for_line(r"request \S+ POST /v1/chat/completions 200 .*request_id=trace-4711", 10)
            # Without one, the balancer makes one; the replica logs the same.
            status, head, _ = lb.chat(messages)
            rid = head.get("x-request-id")
            assert status == 200 and rid, head
            ds[0].wait_for_line(r"request_id=%s\b" % rid, 10)


def test_prometheus_config_and_affinity_rules():
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: scripts/deps.sh installs Debian's prometheus package"
    for cmd in (["check", "config", os.path.join(SOURCE_ROOT, "configs", "prometheus.yml")],
                ["test", "rules", os.path.join(SOURCE_ROOT, "tests", "e2e", "prometheus_rules_test.yml")]):
        p = subprocess.run([promtool] + cmd, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr


if __name__ == "__main__":
    if not os.path.exists(HAPROXY):
        print("haproxy not installed: skipped")
        sys.exit(77)
    run_tests(globals())
