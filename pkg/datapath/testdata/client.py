# A test client for the kernel tests: runs inside an attached cgroup and a
# test network namespace, prints one JSON report per phase, and for "hold"
# phases waits for stdin to close. Servers answer a TCP connect with their
# name and a newline, a datagram with their name.
import ctypes
import json
import socket
import sys

out = {"landed": [], "peers": [], "errors": []}


def report():
    print(json.dumps(out), flush=True)


def name(s):
    buf = b""
    while not buf.endswith(b"\n"):
        d = s.recv(100)
        if not d:
            break
        buf += d
    return buf.decode().strip()


def fmt(p):
    if ":" in p[0]:
        return "[%s]:%d" % (p[0], p[1])
    return "%s:%d" % (p[0], p[1])


def wait():
    sys.stdin.read()


mode = sys.argv[1]
if mode == "tcp6":
    # tcp6 HOST PORT N: N AF_INET6 connects (HOST may be ::ffff:a.b.c.d).
    host, port, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    for _ in range(n):
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.settimeout(3)
        try:
            s.connect((host, port))
            out["landed"].append(name(s))
            out["peers"].append(fmt(s.getpeername()))
        except OSError as e:
            out["errors"].append(str(e))
        s.close()
    report()
elif mode == "unspec":
    # unspec VIPHOST VIPPORT HOST PORT: connect to the VIP, disconnect with
    # AF_UNSPEC, connect to HOST:PORT; report, hold until stdin closes.
    vh, vp, rh, rp = sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(3)
    s.connect((vh, vp))
    out["landed"].append(name(s))
    out["peers"].append(fmt(s.getpeername()))
    libc = ctypes.CDLL(None, use_errno=True)
    unspec = (ctypes.c_ubyte * 16)()
    if libc.connect(s.fileno(), unspec, 16) != 0:
        out["errors"].append("AF_UNSPEC connect: errno %d" % ctypes.get_errno())
    s.connect((rh, rp))
    out["landed"].append(name(s))
    out["peers"].append(fmt(s.getpeername()))
    report()
    wait()
    s.close()
elif mode == "retry":
    # retry HOST PORT N: up to N sockets, each connecting again after a
    # refused connect (the same socket: Linux allows it), until one socket
    # has been refused and then connected; errors are the refusals. Report,
    # hold that socket until stdin closes. Blocking connects: after a
    # non-blocking one fails, the next connect() only reports the abort.
    host, port, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    held = None
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        refused = False
        for _ in range(2):
            try:
                s.connect((host, port))
                out["landed"].append(name(s))
                break
            except ConnectionRefusedError as e:
                out["errors"].append(str(e))
                refused = True
        if refused and out["landed"]:
            held = s
            break
        s.close()
        out["landed"] = []
    report()
    wait()
    if held:
        held.close()
elif mode == "udp":
    # udp FAMILY HOST PORT SOCKETS PER: SOCKETS unconnected sockets, each
    # sending PER datagrams to HOST:PORT with sendto; landed = the answer,
    # peers = recvfrom's address.
    fam = socket.AF_INET6 if sys.argv[2] == "6" else socket.AF_INET
    host, port, ns, per = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    for _ in range(ns):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.settimeout(2)
        for _ in range(per):
            try:
                s.sendto(b"?", (host, port))
                data, addr = s.recvfrom(200)
                out["landed"].append(data.decode())
                out["peers"].append(fmt(addr))
            except OSError as e:
                out["errors"].append(str(e))
        s.close()
    report()
elif mode == "mptcp":
    # mptcp HOST PORT N: N MPTCP connects held until stdin closes.
    host, port, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    held = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
        s.settimeout(3)
        try:
            s.connect((host, port))
            out["landed"].append(name(s))
            out["peers"].append(fmt(s.getpeername()))
            held.append(s)
        except OSError as e:
            out["errors"].append(str(e))
    report()
    wait()
    for s in held:
        s.close()
else:
    sys.exit("unknown mode " + mode)
