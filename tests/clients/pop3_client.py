#!/usr/bin/env python3
"""A legacy POP3 poller, played by Python's poplib, for the gateway tests.

  pop3_client.py --port P --mode ssl|stls --cafile CA --user U --password PW
                 [--login user|plain] [--out DIR] [--dele N [--drop]]

logs in (USER/PASS, or AUTH PLAIN with an initial response), runs STAT,
LIST and UIDL, then TOP n 0 and RETR n for every message, writing
DIR/<n>.eml (dot-unstuffed by poplib, CRLF line ends) and DIR/<n>.top.
With --dele N it deletes message N, then QUITs, or with --drop closes the
socket without QUIT. Prints one JSON line with what it saw. A refused login
prints {"login": "ERR", "error": ...} and exits 0.
"""
import argparse
import base64
import json
import os
import poplib
import ssl
import sys


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=["ssl", "stls"], default="ssl")
    p.add_argument("--cafile", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--login", choices=["user", "plain"], default="user")
    p.add_argument("--out")
    p.add_argument("--dele", type=int)
    p.add_argument("--drop", action="store_true")
    a = p.parse_args()

    ctx = ssl.create_default_context(cafile=a.cafile)
    if a.mode == "ssl":
        m = poplib.POP3_SSL(a.host, a.port, context=ctx, timeout=30)
    else:
        m = poplib.POP3(a.host, a.port, timeout=30)
        m.stls(context=ctx)
    try:
        if a.login == "user":
            m.user(a.user)
            m.pass_(a.password)
        else:
            ir = base64.b64encode(f"\0{a.user}\0{a.password}".encode()).decode()
            resp = m._shortcmd("AUTH PLAIN " + ir)
            if not resp.startswith(b"+OK"):
                raise poplib.error_proto(resp)
    except poplib.error_proto as e:
        print(json.dumps({"login": "ERR", "error": e.args[0].decode(errors="replace")}))
        return 0
    count, size = m.stat()
    sizes = [int(line.split()[1]) for line in m.list()[1]]
    uidls = [line.split()[1].decode() for line in m.uidl()[1]]
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        for n in range(1, count + 1):
            _, lines, _ = m.top(n, 0)
            with open(os.path.join(a.out, f"{n}.top"), "wb") as f:
                f.write(b"\r\n".join(lines) + b"\r\n")
            _, lines, _ = m.retr(n)
            with open(os.path.join(a.out, f"{n}.eml"), "wb") as f:
                f.write(b"\r\n".join(lines) + b"\r\n")
    if a.dele:
        m.dele(a.dele)
    if a.drop:
        m.sock.close()
    else:
        m.quit()
    print(json.dumps({"login": "OK", "count": count, "size": size, "sizes": sizes, "uidls": uidls}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
