#!/usr/bin/env python3
"""A legacy IMAP poller, played by Python's imaplib, for the gateway tests.

  imap_client.py fetch --port P --mode ssl|starttls --cafile CA --user U
                 --password PW --login atom|quoted|literal|authenticate --out DIR

logs in the given way, SELECTs INBOX, FETCHes every message with
BODY.PEEK[] into DIR/<seq>.eml, and LOGOUTs. It prints one JSON line:
{"login": "OK", "capabilities": [...], "count": N}. A refused login prints
{"login": "NO", "error": "..."} and exits 0, so the test can check the text.
"""
import argparse
import json
import os
import ssl
import sys
import imaplib


def main():
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["fetch", "login"])
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=["ssl", "starttls"], default="ssl")
    p.add_argument("--cafile", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--login", default="quoted", choices=["atom", "quoted", "literal", "authenticate"])
    p.add_argument("--out")
    a = p.parse_args()

    ctx = ssl.create_default_context(cafile=a.cafile)
    if a.mode == "ssl":
        m = imaplib.IMAP4_SSL(a.host, a.port, ssl_context=ctx, timeout=30)
    else:
        m = imaplib.IMAP4(a.host, a.port, timeout=30)
        m.starttls(ssl_context=ctx)
    try:
        if a.login == "atom":
            # imaplib sends atoms as they are: LOGIN user password
            typ, data = m._simple_command("LOGIN", a.user, a.password)
            if typ == "OK":
                m.state = "AUTH"
            else:
                raise imaplib.IMAP4.error(data[-1].decode())
        elif a.login == "quoted":
            typ, data = m.login(a.user, a.password)  # quotes the password
        elif a.login == "literal":
            # imaplib's own literal support: LOGIN user {n}, wait for "+".
            m.literal = a.password.encode()
            typ, data = m._simple_command("LOGIN", a.user)
            if typ == "OK":
                m.state = "AUTH"
            else:
                raise imaplib.IMAP4.error(data[-1].decode())
        else:
            typ, data = m.authenticate("PLAIN", lambda _: f"\0{a.user}\0{a.password}".encode())
    except imaplib.IMAP4.error as e:
        print(json.dumps({"login": "NO", "error": str(e)}))
        return 0
    caps = list(m.capabilities)
    if a.command == "login":
        m.logout()
        print(json.dumps({"login": "OK", "capabilities": caps}))
        return 0
    typ, data = m.select("INBOX", readonly=True)
    assert typ == "OK", data
    count = int(data[0])
    os.makedirs(a.out, exist_ok=True)
    for seq in range(1, count + 1):
        typ, data = m.fetch(str(seq), "(BODY.PEEK[])")
        assert typ == "OK", data
        body = data[0][1]
        with open(os.path.join(a.out, f"{seq}.eml"), "wb") as f:
            f.write(body)
    m.logout()
    print(json.dumps({"login": "OK", "capabilities": caps, "count": count}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
