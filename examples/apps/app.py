"""WSGI test app for holdfast's real-server tests (Gunicorn), same as config.ru.

    GET /            sleeps random 20..50 ms, or ?sleep=N ms; answers "pid=<pid>\\n"
    GET /grow?mb=N   allocates N MiB, touches every page and keeps it (memory tests)
    GET /leak        leaks 1 MiB per request (touched)

Every answer is 200 text/plain with an X-Pid header.
APP_BOOT_SLEEP_MS=N sleeps N ms at import (slow-boot tests).
"""

import os
import random
import time
from urllib.parse import parse_qs

KEPT = []  # memory that /grow and /leak keep alive for the process lifetime
MIB = 1024 * 1024

try:
    time.sleep(int(os.environ.get("APP_BOOT_SLEEP_MS", "0")) / 1000.0)
except ValueError:
    pass


def _touched(mb):
    buf = bytearray(mb * MIB)
    for i in range(0, len(buf), 4096):
        buf[i] = 1
    return buf


def _int(params, key):
    try:
        return int(params[key][0])
    except (KeyError, IndexError, ValueError):
        return None


def application(environ, start_response):
    params = parse_qs(environ.get("QUERY_STRING", ""))
    path = environ.get("PATH_INFO", "/")
    pid = os.getpid()
    extra = ""
    if path == "/grow":
        mb = _int(params, "mb") or 1
        KEPT.append(_touched(mb))
        extra = "grew=%dMiB kept=%dMiB\n" % (mb, sum(map(len, KEPT)) // MIB)
    elif path == "/leak":
        KEPT.append(_touched(1))
        extra = "kept=%dMiB\n" % (sum(map(len, KEPT)) // MIB)
    else:
        ms = _int(params, "sleep")
        if ms is None:
            ms = random.randint(20, 50)
        time.sleep(ms / 1000.0)
    body = ("pid=%d\n%s" % (pid, extra)).encode()
    start_response(
        "200 OK",
        [
            ("Content-Type", "text/plain"),
            ("Content-Length", str(len(body))),
            ("X-Pid", str(pid)),
        ],
    )
    return [body]


app = application
