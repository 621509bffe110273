# A Python 3 script for the memory tests that need pages really shared
# copy-on-write between a parent and forked children, which the test worker
# cannot do without `unsafe`. Tests and benchmarks write it to a temp dir
# (include_str!) and run it.
#
# Usage: python3 forking.py SHARED_MB CHILDREN. It allocates and touches
# SHARED_MB MiB, forks CHILDREN children that sleep (sharing those pages),
# sends READY=1 to NOTIFY_SOCKET if set (a leading @ means the abstract
# namespace), and waits. On SIGTERM or SIGINT it terminates and reaps the
# children and exits 0. A child exits when its parent is gone.
import os, signal, socket, sys, time
mb, count = int(sys.argv[1]), int(sys.argv[2])
buf = bytearray(mb * 1024 * 1024)
for i in range(0, len(buf), 4096):
    buf[i] = 1
kids = []
def stop(signum, frame):
    for pid in kids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for pid in kids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
me = os.getpid()
for _ in range(count):
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        while os.getppid() == me:
            time.sleep(0.2)
        os._exit(0)
    kids.append(pid)
addr = os.environ.get("NOTIFY_SOCKET")
if addr:
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(b"READY=1\nSTATUS=serving\n", addr)
    s.close()
print("forking.py %d: %d MiB shared with %d children" % (me, mb, count), flush=True)
while True:
    signal.pause()
