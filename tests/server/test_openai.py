#!/usr/bin/env python3
"""`kvq serve` against the official `openai` client, with the real SmolLM2 model.

Starts two servers on free loopback ports (always killed at exit):
  A: int8 cache with room to spare, an API key: models, chat (whole and streamed), legacy
     completions with stop strings, error cases, 32 concurrent clients, clients that
     disconnect mid-request (all blocks must come back, per GET /health);
  B: a KV budget of about four requests: concurrent requests are preempted and must still
     give exactly their greedy outputs when run alone.

Usage: test_openai.py --kvq target/debug/kvq --model models/SmolLM2-135M-Instruct.Q4_1.gguf
Prints one line per test and "N passed, N failed"; exits non-zero on any failure.
"""

import argparse
import atexit
import concurrent.futures as cf
import json
import re
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request

import openai
from openai import OpenAI

MODEL = "SmolLM2-135M-Instruct.Q4_1"
KEY = "sk-kvq-test"
SERVERS = []


class Server:
    """A `kvq serve` subprocess on 127.0.0.1 and a free port (the server picks it)."""

    def __init__(self, kvq, model, *flags):
        cmd = [kvq, "serve", "--model", model, "--server-name", "127.0.0.1",
               "--server-port", "0", *flags]
        print("starting:", " ".join(cmd), flush=True)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        SERVERS.append(self)
        self.log = []
        found = threading.Event()
        self.port = None

        def read():
            for line in self.proc.stderr:
                self.log.append(line)
                m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
                if m and self.port is None:
                    self.port = int(m.group(1))
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(180) or self.port is None:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.log))
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key=KEY, timeout=120):
        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=timeout)

    def health(self):
        with urllib.request.urlopen(self.url + "/health", timeout=10) as r:
            return json.load(r)

    def wait_all_free(self, seconds=30):
        """Polls /health (bounded) until no request is active and every block is free."""
        deadline = time.time() + seconds
        while True:
            h = self.health()
            idle = h["running"] == 0 and h["waiting"] == 0
            if idle and h["free_blocks"] == h["total_blocks"]:
                return h
            if time.time() > deadline:
                raise AssertionError(f"blocks not all free after {seconds} s: {h}")
            time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@atexit.register
def _kill_servers():
    for s in SERVERS:
        s.stop()


def raw_post(server, path, body, key=KEY):
    """POSTs raw bytes; returns (status, parsed JSON body)."""
    req = urllib.request.Request(server.url + path, data=body, method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def assert_error_shape(body, status):
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"], body
    assert isinstance(err["type"], str), body
    assert "param" in err and "code" in err, body
    return err


def chat(client, prompt, **kw):
    kw.setdefault("max_tokens", 16)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], **kw)


# --- server A ---------------------------------------------------------------------------

def test_models(a):
    ids = [m.id for m in a.client().models.list()]
    assert ids == [MODEL], ids


def test_chat_completion_and_stream(a):
    c = a.client()
    whole = chat(c, "What is the capital of France?")
    text = whole.choices[0].message.content
    assert "Paris" in text, text
    assert whole.choices[0].finish_reason in ("stop", "length")
    u = whole.usage
    assert u.prompt_tokens > 0 and u.completion_tokens > 0, u
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens, u

    pieces, usage, reasons, roles = [], None, [], []
    for chunk in chat(c, "What is the capital of France?", stream=True,
                      stream_options={"include_usage": True}):
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.role:
                roles.append(ch.delta.role)
            if ch.delta.content:
                pieces.append(ch.delta.content)
            if ch.finish_reason:
                reasons.append(ch.finish_reason)
    assert roles == ["assistant"], roles
    assert "".join(pieces) == text, ("".join(pieces), text)
    assert reasons == [whole.choices[0].finish_reason], reasons
    assert usage is not None and usage.total_tokens == u.total_tokens, usage


def test_completions_with_stop(a):
    c = a.client()
    full = c.completions.create(model=MODEL, prompt="The capital of France is",
                                max_tokens=12, temperature=0)
    text = full.choices[0].text
    words = text.split(" ")
    assert len(words) >= 4, text
    stop = " " + words[2]
    cut = c.completions.create(model=MODEL, prompt="The capital of France is",
                               max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)], (cut.choices[0].text, text, stop)
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0,
        stop=stop, stream=True) if ch.choices)
    assert streamed == cut.choices[0].text, (streamed, cut.choices[0].text)


def test_choices_and_logprobs(a):
    c = a.client()
    whole = chat(c, "What is the capital of France?", n=2, logprobs=True, top_logprobs=3)
    assert [ch.index for ch in whole.choices] == [0, 1], whole
    entries = 0
    for ch in whole.choices:
        content = ch.logprobs.content
        entries += len(content)
        # A stop token that ended the answer has an entry but no text.
        assert "".join(t.token for t in content).startswith(ch.message.content), ch
        for t in content:
            assert t.logprob <= 0 and len(t.top_logprobs) == 3, t
            assert bytes(t.bytes).decode() == t.token, t
            assert t.top_logprobs[0].logprob == t.logprob, t  # greedy: the most likely
    assert whole.choices[0].message.content == whole.choices[1].message.content
    assert entries == whole.usage.completion_tokens, (entries, whole.usage)
    pieces = {0: [], 1: []}
    for chunk in chat(c, "What is the capital of France?", n=2, stream=True, logprobs=True):
        for ch in chunk.choices:
            if ch.logprobs and ch.logprobs.content:
                pieces[ch.index] += [t.token for t in ch.logprobs.content]
    for i in (0, 1):
        assert pieces[i] == [t.token for t in whole.choices[i].logprobs.content], pieces[i]
    comp = c.completions.create(model=MODEL, prompt="The capital of France is",
                                max_tokens=8, temperature=0, logprobs=2,
                                presence_penalty=0.5, frequency_penalty=0.5)
    lp = comp.choices[0].logprobs
    assert "".join(lp.tokens).startswith(comp.choices[0].text), lp
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(lp.tokens)
    several = c.completions.create(model=MODEL, prompt=["The capital of France is",
                                                        "The capital of Italy is"],
                                   max_tokens=6, temperature=0)
    assert [ch.index for ch in several.choices] == [0, 1], several
    assert several.choices[0].text == c.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0).choices[0].text
    # A loglikelihood request as lm-evaluation-harness sends it: token ids, echo, one new token.
    ids = [504, 3575, 282, 4649, 314]
    scored = c.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0,
                                  logprobs=1, echo=True)
    lp = scored.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1, lp
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, lp
    assert all(x <= 0 for x in lp.token_logprobs[1:]), lp
    assert all(len(t) == 1 for t in lp.top_logprobs[1:]), lp


def expect(exc_type, status, fn, code=None, param=None):
    try:
        fn()
    except exc_type as e:
        assert e.status_code == status, (e.status_code, e)
        err = assert_error_shape({"error": e.body}, status)
        if code is not None:
            assert err["code"] == code, err
        if param is not None:
            assert err["param"] == param, err
        return
    raise AssertionError(f"expected {exc_type.__name__} ({status})")


def test_errors(a):
    c = a.client()
    expect(openai.NotFoundError, 404,
           lambda: c.chat.completions.create(model="no-such-model", messages=[
               {"role": "user", "content": "hi"}], max_tokens=4),
           code="model_not_found", param="model")
    expect(openai.BadRequestError, 400, lambda: chat(c, "hi", n=17), param="n")
    expect(openai.BadRequestError, 400, lambda: chat(c, "hi", top_logprobs=3),
           param="top_logprobs")
    expect(openai.BadRequestError, 400, lambda: chat(c, "hi", temperature=5), param="temperature")
    expect(openai.BadRequestError, 400, lambda: chat(c, "hi", top_p=0), param="top_p")
    expect(openai.BadRequestError, 400, lambda: chat(c, "word " * 9000),
           code="context_length_exceeded", param="messages")
    expect(openai.AuthenticationError, 401, lambda: chat(a.client(key="sk-wrong"), "hi"),
           code="invalid_api_key")
    status, body = raw_post(a, "/v1/chat/completions", b'{"model": "' + MODEL.encode())
    assert status == 400 and "malformed JSON" in assert_error_shape(body, 400)["message"], body
    status, body = raw_post(a, "/v1/chat/completions", json.dumps({"model": MODEL}).encode())
    assert status == 400 and assert_error_shape(body, 400)["param"] == "messages", body
    status, body = raw_post(a, "/v1/completions", b'{"model": "x", "prompt": "hi"}', key="bad")
    assert status == 401, (status, body)
    a.wait_all_free()


def test_32_concurrent_clients(a):
    c = a.client()
    prompts = [f"Give me a word that rhymes with '{w}'." for w in (
        "cat dog sun tree blue red car star moon rain book cake fish hat king lake "
        "milk nest owl pen queen rose ship toy van wall yarn zoo bell coat door frog").split()]
    assert len(prompts) == 32

    def one(p):
        r = chat(c, p, max_tokens=8)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage

    with cf.ThreadPoolExecutor(32) as ex:
        results = list(ex.map(one, prompts))
    assert len(results) == 32
    for text, reason, usage in results:
        assert text and reason in ("stop", "length"), (text, reason)
        assert 1 <= usage.completion_tokens <= 8, usage
    a.wait_all_free()


def test_disconnect_cancels_and_frees_blocks(a):
    c = a.client()
    streams = [c.completions.create(model=MODEL, prompt=f"Story number {i}:", max_tokens=3000,
                                    temperature=0, stream=True, extra_body={"ignore_eos": True})
               for i in range(3)]
    for s in streams:
        for n, _ in enumerate(s):
            if n == 3:
                break
    assert a.health()["running"] > 0
    for s in streams:
        s.close()  # the client goes away mid-stream
    a.wait_all_free()
    # A non-streamed request whose client gives up (times out) is cancelled too.
    try:
        a.client(timeout=1.0).completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=3000, temperature=0,
            extra_body={"ignore_eos": True})
        raise AssertionError("expected a client timeout")
    except openai.APITimeoutError:
        pass
    a.wait_all_free()


# --- server B ---------------------------------------------------------------------------

PREEMPT_PROMPTS = [
    "What is the capital of France?", "Name three colors.", "Write a haiku about the sea.",
    "What is 2+2?", "Tell me a fun fact about cats.", "What is the boiling point of water?",
    "Who wrote Hamlet?", "Describe a tree in one sentence.", "List two fruits.",
    "What is the largest planet?", "Say hello in Spanish.", "What day comes after Monday?",
]


def test_preemption_keeps_every_answer(b):
    h = b.health()
    assert h["total_blocks"] <= 24, f"the budget is meant to be tiny: {h}"
    c = b.client()

    def one(p):
        r = chat(c, p, max_tokens=24)
        return r.choices[0].message.content, r.usage.completion_tokens

    alone = [one(p) for p in PREEMPT_PROMPTS]
    assert b.health()["preemptions"] == 0, "a request alone fits"
    with cf.ThreadPoolExecutor(len(PREEMPT_PROMPTS)) as ex:
        together = list(ex.map(one, PREEMPT_PROMPTS))
    h = b.wait_all_free()
    assert h["preemptions"] > 0, f"the budget was meant to force preemption: {h}"
    for p, x, y in zip(PREEMPT_PROMPTS, alone, together):
        assert x == y, f"{p!r}: alone {x!r}, concurrently {y!r}"
    print(f"    {h['preemptions']} preemptions, every answer as when run alone", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvq", required=True)
    ap.add_argument("--model", required=True)
    args = ap.parse_args()
    passed, failed = 0, 0

    def run(test, server):
        nonlocal passed, failed
        t = time.time()
        try:
            test(server)
            passed += 1
            print(f"ok   {test.__name__} ({time.time() - t:.1f} s)", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {test.__name__} ({time.time() - t:.1f} s)", flush=True)
            traceback.print_exc()
            sys.stdout.flush()

    a = Server(args.kvq, args.model, "--quant-policy", "8", "--cache-memory-gib", "0.1",
               "--api-keys", KEY)
    for test in (test_models, test_chat_completion_and_stream, test_completions_with_stop,
                 test_choices_and_logprobs, test_errors, test_32_concurrent_clients,
                 test_disconnect_cancels_and_frees_blocks):
        run(test, a)
    a.stop()
    b = Server(args.kvq, args.model, "--quant-policy", "8", "--cache-memory-gib", "0.003",
               "--block-size", "16", "--api-keys", KEY)
    run(test_preemption_keeps_every_answer, b)
    b.stop()
    if failed:
        for s in (a, b):
            print("--- server log:\n" + "".join(s.log), flush=True)
    print(f"{passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
