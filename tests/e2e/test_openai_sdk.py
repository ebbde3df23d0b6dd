"""test_openai_sdk.py - a real, unmodified client: the official OpenAI Node SDK (npm
"openai", pinned by tests/e2e/package.json and package-lock.json) runs
sdk_client.mjs against kvd, with an API key configured.

The SDK is installed with `npm ci` into tests/e2e/node_modules when it is not there
yet (the npm registry is the only network the tests use).
"""

import fcntl
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from kvd_e2e import Daemon, run_tests  # noqa: E402


def ensure_sdk():
    # Several build directories share this source tree; the lock keeps a second test
    # run from using node_modules while `npm ci` (which empties it first) runs.
    with open(os.path.join(HERE, "node_modules.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(os.path.join(HERE, "node_modules", "openai", "package.json")):
            return
        npm = shutil.which("npm")
        assert npm, "npm is required (scripts/deps.sh installs it)"
        out = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=HERE,
                             capture_output=True, text=True, timeout=110)
        assert out.returncode == 0, "npm ci failed:\n" + out.stdout + out.stderr


def test_openai_node_sdk():
    ensure_sdk()
    node = shutil.which("node")
    assert node, "node is required"
    with Daemon("--kv-cache-mb", "4", "--api-key", "sk-kvd-e2e") as d:
        env = dict(os.environ, KVD_BASE_URL="http://127.0.0.1:%d/v1" % d.port, KVD_API_KEY="sk-kvd-e2e")
        out = subprocess.run([node, os.path.join(HERE, "sdk_client.mjs")], env=env, capture_output=True, text=True,
                             timeout=90)
        print(out.stdout.rstrip())
        assert out.returncode == 0, out.stdout + out.stderr
        assert "9 passed, 0 failed" in out.stdout, out.stdout


if __name__ == "__main__":
    run_tests(globals())
