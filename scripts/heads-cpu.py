#!/usr/bin/env python3
# 150/450 connections each holding a 7 KB unfinished head on GET /v1/stream;
# prints the server's CPU (utime+stime of its process) over 10 s.
import os, socket, subprocess, sys, tempfile, time
bin_, conns = sys.argv[1], int(sys.argv[2])
d = tempfile.mkdtemp()
port = 18000 + os.getpid() % 1000
env = dict(os.environ, PUSHGATE_SERVER__LISTEN=f"127.0.0.1:{port}",
           PUSHGATE_STORE__URL=f"sqlite://{d}/log.db", PUSHGATE_LOG="error",
           PUSHGATE_LIMITS__CONNECTIONS_PER_CLIENT="0",
           PUSHGATE_SERVER__HEADER_TIMEOUT="60s")
p = subprocess.Popen([bin_, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
for _ in range(100):
    try:
        socket.create_connection(("127.0.0.1", port)).close(); break
    except OSError: time.sleep(0.05)
head = b"GET /v1/stream?channel=a HTTP/1.1\r\nhost: 127.0.0.1\r\nx-pad: " + b"p" * 7000
socks = []
for _ in range(conns):
    s = socket.create_connection(("127.0.0.1", port)); s.sendall(head); socks.append(s)
def cpu():
    f = open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
time.sleep(1); c0 = cpu(); time.sleep(10); c1 = cpu()
print(f'{{"conns":{conns},"server_cpu_percent":{(c1-c0)/10*100:.1f}}}')
for s in socks: s.close()
p.terminate(); p.wait()
