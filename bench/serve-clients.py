#!/usr/bin/env python3
"""SSE clients for bench/serve.sh (standard library only).

  serve-clients.py delay URL RUN_ID GO_FILE    one client; creates GO_FILE once connected
                                               (the task waits for it), then prints p50/p99
                                               of the delay (ms) from the task printing its
                                               clock to the line reaching the client
  serve-clients.py many URL RUN_ID N           N clients at once; prints how many saw
                                               the run's `end` and the events each got
"""
import http.client
import json
import sys
import threading
import time
import urllib.parse


def stream(url, path):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    conn.request("GET", path, headers={"Accept": "text/event-stream"})
    res = conn.getresponse()
    name, data = None, []
    while True:
        line = res.readline()
        if not line:
            return
        line = line.decode().rstrip("\r\n")
        if line == "":
            if name is not None:
                yield name, "\n".join(data)
            name, data = None, []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)


def delay(url, run, go):
    delays = []
    for name, data in stream(url, f"/api/v1/runs/{run}/events"):
        if go is not None:
            open(go, "w").close()
            go = None
        now = time.time_ns()
        if name == "task_log":
            line = json.loads(data)["line"]
            if line.startswith("clock "):
                delays.append((now - int(line.split()[1])) / 1e6)
        if name == "end":
            break
    delays.sort()
    if not delays:
        print("no clock lines seen", file=sys.stderr)
        sys.exit(1)
    p = lambda q: delays[min(len(delays) - 1, int(q * len(delays)))]
    print(f"{len(delays)} {p(0.5):.2f} {p(0.99):.2f} {delays[-1]:.2f}")


def many(url, run, n):
    counts = [0] * n
    ended = [False] * n
    started = threading.Barrier(n + 1)

    def client(i):
        it = stream(url, f"/api/v1/runs/{run}/events")
        started.wait()
        for name, _ in it:
            counts[i] += 1
            if name == "end":
                ended[i] = True
                break

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    started.wait()
    print("connected", flush=True)
    for t in threads:
        t.join(900)
    print(f"{sum(ended)} {min(counts)} {max(counts)}")


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "delay":
        delay(sys.argv[2], sys.argv[3], sys.argv[4])
    elif mode == "many":
        many(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(__doc__)
