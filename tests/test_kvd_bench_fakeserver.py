#!/usr/bin/env python3
"""test_kvd_bench_fakeserver.py - a scripted OpenAI-style streaming server for kvd-bench tests.

Not a model and not a test of kvd: it exists so kvd-bench's HTTP, SSE, load-control and
statistics code can be checked against answers known in advance. Every answer is a pure
function of the request (token i of a completion is " w<i>", a chat reply is derived from
the last user message), usage counts words, and the server checks what kvd-bench sends:
the request fields, and for chat that every earlier assistant turn is exactly the reply it
streamed (so a history kvd-bench mangled is a 400); usage reports the history before the
last user message as cached_tokens, as a server whose prefix cache kept it would. Faults are injected by arrival order
of POST requests (--fault KIND:N), so their counts are deterministic. GET /stats returns
what the server saw (requests, turn positions, the most requests in flight at once, a
digest of all prompts); GET /stats?reset=1 also clears it.

Usage: test_kvd_bench_fakeserver.py [--port 0] [--first-delay-ms 20] [--token-delay-ms 2]
         [--eos-after 5] [--no-usage] [--http10] [--api-key K] [--loading-s S]
         [--fault KIND:N ...]
KIND: http500, timeout, badjson, errorevent, cut, nodone, linger. Prints
"fake: listening on http://127.0.0.1:PORT" once ready.
"""
import argparse
import hashlib
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse, parse_qs

MODEL = "fake-model"
SYSTEM_PROMPT = "You are a helpful assistant."


def reply_words(user_text, n):
    """The deterministic assistant reply to a user message, n words long."""
    seed = int(hashlib.sha256(user_text.encode()).hexdigest()[:8], 16)
    return ["r%d" % ((seed + i * 7919) % 1000) for i in range(n)]


class State:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.ready_at = time.monotonic() + args.loading_s
        self.faults = {}
        for spec in args.fault:
            kind, _, n = spec.partition(":")
            self.faults[int(n)] = kind
        self.reset()

    def reset(self):
        self.posts = 0
        self.inflight = 0
        self.max_inflight = 0
        self.turns = {}
        self.turn_order = []  # the turn of each accepted POST, in arrival order
        self.prompts = []
        self.histories_checked = 0
        self.unauthorized = 0
        self.session_ids = []  # X-Session-ID of each POST, in arrival order (None: absent)
        self.request_ids = []  # X-Request-ID of each POST, in arrival order (None: absent)


class Handler(BaseHTTPRequestHandler):
    server_version = "fake/1"

    def log_message(self, fmt, *args):
        pass

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # -- plumbing --

    def release(self):
        """Ends this request's in-flight count; called before its last bytes are written,
        since a client may start its next request the moment it reads them."""
        state = self.server.state
        if getattr(self, "counted", False):
            with state.lock:
                state.inflight -= 1
            self.counted = False

    def send_json(self, status, obj):
        self.release()
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def start_stream(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        if not self.server.state.args.http10:
            self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True

    def write_raw(self, data):
        if self.server.state.args.http10:
            self.wfile.write(data)
        else:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def event(self, obj):
        text = obj if isinstance(obj, str) else json.dumps(obj)
        data = ("data: %s\n\n" % text).encode()
        # Split every event in two writes so partial lines reach the client.
        half = len(data) // 2
        self.write_raw(data[:half])
        self.write_raw(data[half:])

    def end_stream(self):
        if not self.server.state.args.http10:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    # -- routes --

    def loading(self):
        state = self.server.state
        if time.monotonic() < state.ready_at:
            self.send_json(503, {"error": {"message": "the model is loading", "code": "loading"}})
            return True
        return False

    def do_GET(self):
        state = self.server.state
        url = urlparse(self.path)
        if url.path == "/v1/models":
            if self.loading():
                return
            if not self.authorized():
                return
            self.send_json(200, {"object": "list",
                                 "data": [{"id": MODEL, "object": "model"}]})
        elif url.path == "/stats":
            with state.lock:
                stats = {
                    "posts": state.posts,
                    "max_inflight": state.max_inflight,
                    "turns": {str(k): v for k, v in sorted(state.turns.items())},
                    "turn_order": state.turn_order,
                    "prompt_digest": hashlib.sha256(
                        "\n".join(sorted(state.prompts)).encode()).hexdigest(),
                    "histories_checked": state.histories_checked,
                    "unauthorized": state.unauthorized,
                    "session_ids": state.session_ids,
                    "request_ids": state.request_ids,
                }
                if parse_qs(url.query).get("reset"):
                    state.reset()
            self.send_json(200, stats)
        else:
            self.send_json(404, {"error": {"message": "no route " + url.path}})

    def authorized(self):
        state = self.server.state
        key = state.args.api_key
        if key and self.headers.get("Authorization") != "Bearer " + key:
            with state.lock:
                state.unauthorized += 1
            self.send_json(401, {"error": {"message": "bad api key"}})
            return False
        return True

    def do_POST(self):
        state = self.server.state
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        if self.loading() or not self.authorized():
            return
        with state.lock:
            state.posts += 1
            number = state.posts
            state.session_ids.append(self.headers.get("X-Session-ID"))
            state.request_ids.append(self.headers.get("X-Request-ID"))
            state.inflight += 1
            state.max_inflight = max(state.max_inflight, state.inflight)
        self.counted = True
        try:
            self.handle_post(raw, state.faults.get(number))
        finally:
            self.release()

    def bad_request(self, why):
        self.send_json(400, {"error": {"message": why}})

    def handle_post(self, raw, fault):
        state = self.server.state
        args = state.args
        try:
            req = json.loads(raw)
        except ValueError:
            return self.bad_request("body is not JSON")
        chat = self.path == "/v1/chat/completions"
        if not chat and self.path != "/v1/completions":
            return self.send_json(404, {"error": {"message": "no route " + self.path}})
        if req.get("model") != MODEL:
            return self.bad_request("unknown model %r" % req.get("model"))
        if req.get("stream") is not True:
            return self.bad_request("stream must be true")
        include_usage = (req.get("stream_options") or {}).get("include_usage") is True
        if not include_usage:
            return self.bad_request("stream_options.include_usage must be true")
        max_tokens = req.get("max_tokens")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return self.bad_request("bad max_tokens")
        if self.headers.get("Accept") != "text/event-stream":
            return self.bad_request("Accept must be text/event-stream")

        if chat:
            msgs = req.get("messages")
            if not isinstance(msgs, list) or not msgs or msgs[0].get("role") != "system" \
                    or msgs[0].get("content") != SYSTEM_PROMPT:
                return self.bad_request("first message must be the system prompt")
            rest = msgs[1:]
            if len(rest) % 2 != 1:
                return self.bad_request("history must end with a user message")
            for i, m in enumerate(rest):
                want = "user" if i % 2 == 0 else "assistant"
                if m.get("role") != want or not isinstance(m.get("content"), str):
                    return self.bad_request("message %d should be %s" % (i + 1, want))
                if want == "assistant":
                    words = m["content"].split(" ")
                    if m["content"] != " ".join(reply_words(rest[i - 1]["content"], len(words))):
                        return self.bad_request("assistant turn %d is not what was sent" % i)
            prompt_tokens = sum(len(m["content"].split()) for m in rest)
            cached_tokens = prompt_tokens - len(rest[-1]["content"].split())
            user_text = rest[-1]["content"]
            turn = len(rest) // 2 + 1
            with state.lock:
                state.histories_checked += len(rest) // 2
        else:
            prompt = req.get("prompt")
            if not isinstance(prompt, str):
                return self.bad_request("prompt must be a string")
            prompt_tokens = len(prompt.split())
            cached_tokens = 0
            user_text = prompt
            turn = 1
        with state.lock:
            state.turns[turn] = state.turns.get(turn, 0) + 1
            state.turn_order.append(turn)
            state.prompts.append(user_text)

        if fault == "http500":
            return self.send_json(500, {"error": {"message": "injected failure"}})
        n = max_tokens if req.get("ignore_eos") is True else min(max_tokens, args.eos_after)
        words = reply_words(user_text, n) if chat else ["w%d" % i for i in range(n)]
        self.start_stream()
        if fault == "timeout":
            time.sleep(30)
            return
        time.sleep(args.first_delay_ms / 1000.0)
        if chat:
            self.event({"object": "chat.completion.chunk", "model": MODEL,
                        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": None}]})
        for i, w in enumerate(words):
            if i > 0:
                time.sleep(args.token_delay_ms / 1000.0)
            if fault == "badjson" and i == 1:
                self.event("{\"choices\": [ oops")
            if fault == "errorevent" and i == 1:
                self.event({"error": {"message": "injected error event", "type": "server_error"}})
            if fault == "cut" and i == 1:
                self.release()
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            text = w if (chat and i == 0) else " " + w
            last = i == n - 1
            if chat:
                self.event({"object": "chat.completion.chunk", "model": MODEL,
                            "choices": [{"index": 0, "delta": {"content": text},
                                         "finish_reason": ("length" if last else None)}]})
            else:
                self.event({"object": "text_completion", "model": MODEL,
                            "choices": [{"index": 0, "text": text,
                                         "finish_reason": ("length" if last else None)}]})
        if not args.no_usage:
            self.event({"choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                 "completion_tokens": n,
                                                 "total_tokens": prompt_tokens + n,
                                                 "prompt_tokens_details":
                                                     {"cached_tokens": cached_tokens}}})
        self.release()
        if fault != "nodone":
            self.event("[DONE]")
        if fault == "linger":
            time.sleep(5)  # a server slow to end its message after [DONE]
        self.end_stream()


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # kvd-bench hanging up mid-stream (timeouts, --duration) is expected


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--first-delay-ms", type=float, default=20)
    ap.add_argument("--token-delay-ms", type=float, default=2)
    ap.add_argument("--eos-after", type=int, default=5)
    ap.add_argument("--no-usage", action="store_true")
    ap.add_argument("--http10", action="store_true",
                    help="close-delimited bodies instead of chunked encoding")
    ap.add_argument("--api-key", default="")
    ap.add_argument("--fault", action="append", default=[])
    ap.add_argument("--loading-s", type=float, default=0,
                    help="answer 503 (loading) for this long after start")
    args = ap.parse_args()
    Handler.protocol_version = "HTTP/1.0" if args.http10 else "HTTP/1.1"
    server = QuietServer(("127.0.0.1", args.port), Handler)
    server.state = State(args)
    print("fake: listening on http://127.0.0.1:%d" % server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
