#!/usr/bin/env python3
"""Check the harness's Postfix end to end (Python 3 stdlib only).

Usage: smtpcheck.py DIR   (DIR as given to `start`; the harness must be running)

Upstream (SMTP_PORT with STARTTLS, SMTPS_PORT with implicit TLS): EHLO
capabilities before and after TLS, no AUTH before TLS, the bytes of a rejected
XOAUTH2 token, refusal of unauthenticated mail, AUTH XOAUTH2 and OAUTHBEARER
with real tokens (235 2.7.0), then messages for new, never seeded addresses
(8BITMIME, SMTPUTF8 with UTF-8 headers, a 10 MB message, BDAT in two chunks,
a long line, dot-stuffing) read back over IMAPS as their recipients: BODY[] is
Postfix's and the delivery's trace headers followed by the sent bytes.
Relay (relay-mta): a relay through a fake smarthost in this script (STARTTLS
or implicit TLS, AUTH PLAIN) delivers with the right credentials, envelope
and bytes; a relay through the real upstream (no PLAIN there) logs its
deferred attempt. Prints the SMTP replies it checks. Exits non-zero on failure.
"""
import base64
import imaplib
import json
import os
import re
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok   {what}")


class Smtp:
    """A line-level SMTP client that shows the exact reply bytes."""

    def __init__(self, port, ctx, tls=False):
        self.ctx = ctx
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        if tls:
            self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")
        self.f = self.sock.makefile("rb")
        self.greeting = self.reply()

    def reply(self):
        lines = []
        while True:
            line = self.f.readline()
            if not line:
                raise EOFError("connection closed")
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    def cmd(self, line):
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def starttls(self):
        r = self.cmd(b"STARTTLS")
        assert r.startswith(b"220 "), r
        self.sock = self.ctx.wrap_socket(self.sock, server_hostname="localhost")
        self.f = self.sock.makefile("rb")
        return r

    def ehlo(self):
        r = self.cmd(b"EHLO client.example.test")
        return r, [l[4:].decode().strip() for l in r.split(b"\r\n")[1:] if l]

    def data(self, msg):
        r = self.cmd(b"DATA")
        assert r.startswith(b"354"), r
        stuffed = re.sub(rb"(?m)^\.", b"..", msg)
        if not stuffed.endswith(b"\r\n"):
            stuffed += b"\r\n"
        self.sock.sendall(stuffed + b".\r\n")
        return self.reply()

    def close(self):
        try:
            self.cmd(b"QUIT")
        except (OSError, EOFError):
            pass
        self.sock.close()


def b64(s):
    return base64.b64encode(s.encode() if isinstance(s, str) else s)


def xoauth2(user, token):
    return b64(f"user={user}\x01auth=Bearer {token}\x01\x01")


def oauthbearer(user, token):
    return b64(f"n,a={user},\x01auth=Bearer {token}\x01\x01")


class Harness:
    def __init__(self, d):
        with open(os.path.join(d, "harness.json")) as f:
            self.env = json.load(f)
        self.dir = d
        self.ctx = ssl.create_default_context(cafile=self.env["CA_FILE"])

    def token(self, user):
        out = subprocess.run(
            [sys.executable, os.path.join(HERE, "authorize.py"), "--issuer", self.env["OAUTH_ISSUER"],
             "--client-id", "mailgate-test", "--client-secret", "mailgate-test-secret", "--user", user,
             "--scope", "openid offline_access mail"], capture_output=True, text=True, check=True).stdout
        return json.loads(out)["access_token"]

    def login(self, port, user, token, tls=False, mech=b"XOAUTH2"):
        c = Smtp(port, self.ctx, tls=tls)
        if not tls:
            c.ehlo()
            c.starttls()
        c.ehlo()
        ir = xoauth2(user, token) if mech == b"XOAUTH2" else oauthbearer(user, token)
        r = c.cmd(b"AUTH " + mech + b" " + ir)
        return c, r

    def imap_fetch(self, user, token, msgid, timeout=20):
        """BODY[] of the message with this Message-ID in user's INBOX (waits for delivery)."""
        deadline = time.monotonic() + timeout
        while True:
            c = imaplib.IMAP4_SSL("127.0.0.1", self.env["IMAPS_PORT"], ssl_context=self.ctx)
            try:
                c.authenticate("XOAUTH2", lambda _: f"user={user}\x01auth=Bearer {token}\x01\x01".encode())
                c.select("INBOX", readonly=True)
                typ, data = c.uid("SEARCH", None, "HEADER", "Message-ID", msgid)
                uids = data[0].split()
                if uids:
                    typ, data = c.uid("FETCH", uids[-1], "(BODY.PEEK[])")
                    return data[0][1]
            finally:
                c.logout()
            if time.monotonic() > deadline:
                return None
            time.sleep(0.2)


TRACE = (b"Return-Path:", b"Delivered-To:", b"Received:")


def trace_then(body, sent):
    """body == (Return-Path, Delivered-To, Received headers) + sent, byte for byte."""
    if body is None or not body.endswith(sent):
        return False
    prefix = body[: len(body) - len(sent)]
    fields = re.split(rb"\r\n(?![ \t])", prefix)
    return fields[-1] == b"" and all(f.startswith(TRACE) for f in fields[:-1]) and len(fields) == 4


def message(msgid, sender, rcpt, subject, body, extra=b""):
    return (b"From: " + sender + b"\r\nTo: " + rcpt + b"\r\nSubject: " + subject + b"\r\nMessage-ID: " + msgid +
            b"\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n" + extra + b"\r\n" + body)


# ---- a fake smarthost for relay-mta: STARTTLS or implicit TLS, AUTH PLAIN ----
class FakeSmarthost:
    def __init__(self, ctx_server, implicit, user, password):
        self.ctx = ctx_server
        self.implicit = implicit
        self.creds = (user, password)
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(8)
        self.port = self.lsock.getsockname()[1]
        self.received = []   # (auth user, auth password, mail from line, rcpt lines, data bytes)
        self.auth_lines = []
        self.event = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                s, _ = self.lsock.accept()
            except OSError:
                return
            threading.Thread(target=self.session, args=(s,), daemon=True).start()

    def session(self, s):
        try:
            if self.implicit:
                s = self.ctx.wrap_socket(s, server_side=True)
            f = s.makefile("rb")
            tls = self.implicit
            authed = None
            mail, rcpts = None, []
            s.sendall(b"220 smarthost.test ESMTP fake\r\n")
            while True:
                line = f.readline()
                if not line:
                    return
                cmd = line.rstrip(b"\r\n")
                verb = cmd.split(b" ", 1)[0].upper()
                if verb == b"EHLO":
                    caps = [b"smarthost.test", b"PIPELINING", b"8BITMIME", b"ENHANCEDSTATUSCODES"]
                    caps += [b"AUTH PLAIN"] if tls else [b"STARTTLS"]
                    s.sendall(b"".join(b"250-" + c + b"\r\n" for c in caps[:-1]) + b"250 " + caps[-1] + b"\r\n")
                elif verb == b"STARTTLS" and not tls:
                    s.sendall(b"220 2.0.0 go ahead\r\n")
                    s = self.ctx.wrap_socket(s, server_side=True)
                    f = s.makefile("rb")
                    tls = True
                elif verb == b"AUTH":
                    self.auth_lines.append(cmd)
                    parts = cmd.split(b" ")
                    if len(parts) == 3 and parts[1].upper() == b"PLAIN":
                        ir = parts[2]
                    else:
                        s.sendall(b"334 \r\n")
                        ir = f.readline().strip()
                    _, u, p = base64.b64decode(ir).split(b"\0")
                    if (u.decode(), p.decode()) == self.creds:
                        authed = (u.decode(), p.decode())
                        s.sendall(b"235 2.7.0 Authentication successful\r\n")
                    else:
                        s.sendall(b"535 5.7.8 bad credentials\r\n")
                elif verb == b"MAIL":
                    if authed:
                        mail, rcpts = cmd, []
                        s.sendall(b"250 2.1.0 Ok\r\n")
                    else:
                        s.sendall(b"530 5.7.0 Authentication required\r\n")
                elif verb == b"RCPT":
                    rcpts.append(cmd)
                    s.sendall(b"250 2.1.5 Ok\r\n")
                elif verb == b"DATA":
                    s.sendall(b"354 go\r\n")
                    buf = []
                    while True:
                        l = f.readline()
                        if l in (b".\r\n", b""):
                            break
                        buf.append(l[1:] if l.startswith(b".") else l)
                    self.received.append((authed, mail, rcpts, b"".join(buf)))
                    s.sendall(b"250 2.0.0 Ok: queued\r\n")
                    self.event.set()
                elif verb == b"RSET":
                    mail, rcpts = None, []
                    s.sendall(b"250 2.0.0 Ok\r\n")
                elif verb == b"QUIT":
                    s.sendall(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    s.sendall(b"502 5.5.2 unknown\r\n")
        except (OSError, ValueError):
            pass
        finally:
            s.close()

    def close(self):
        self.lsock.close()


def relay_mta(d, *args):
    out = subprocess.run([os.path.join(HERE, "relay-mta"), d, *args], capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        return None
    return json.loads(out.stdout)


def relay_stop(d, port):
    subprocess.run([os.path.join(HERE, "relay-mta"), "--stop", d, str(port)], check=True, capture_output=True)


def wait_log(path, pattern, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as f:
                m = re.search(pattern, f.read())
            if m:
                return m.group(0).decode(errors="replace")
        except FileNotFoundError:
            pass
        time.sleep(0.2)
    return None


def main():
    d = os.path.abspath(sys.argv[1]) if len(sys.argv) == 2 else sys.exit(__doc__)
    h = Harness(d)
    env = h.env
    run = secrets.token_hex(4)
    sender = f"pf-sender-{run}@example.test"
    rcpt = f"pf-{run}@example.test"          # never seeded: delivery must create its Maildir
    rcpt2 = f"pf-big-{run}@example.test"
    t_sender, t_rcpt, t_rcpt2 = h.token(sender), h.token(rcpt), h.token(rcpt2)

    # ---- SMTP_PORT before TLS ----
    c = Smtp(env["SMTP_PORT"], h.ctx)
    print(f"     greeting: {c.greeting!r}")
    check(c.greeting.startswith(b"220 "), "SMTP_PORT greets with 220")
    r, caps = c.ehlo()
    print(f"     EHLO before TLS: {caps}")
    check("STARTTLS" in caps and not any(x.startswith("AUTH") for x in caps), "before TLS: STARTTLS, no AUTH")
    r = c.cmd(b"AUTH XOAUTH2 " + xoauth2(sender, t_sender))
    print(f"     AUTH before TLS: {r!r}")
    check(r.startswith(b"503 5.5.1"), "AUTH before STARTTLS is refused (503 5.5.1)")
    r = c.starttls()
    r, caps = c.ehlo()
    print(f"     EHLO after STARTTLS: {caps}")
    size = next(int(x.split()[1]) for x in caps if x.startswith("SIZE "))
    check(size == env["SMTP_MAX_SIZE"] >= 30 * 1024 * 1024, f"SIZE {size} = SMTP_MAX_SIZE, >= 30 MiB")
    for cap in ("AUTH XOAUTH2 OAUTHBEARER", "8BITMIME", "SMTPUTF8", "CHUNKING", "PIPELINING",
                "ENHANCEDSTATUSCODES", "DSN"):
        check(cap in caps, f"after STARTTLS: {cap}")
    r = c.cmd(b"MAIL FROM:<" + sender.encode() + b">")
    r = c.cmd(b"RCPT TO:<" + rcpt.encode() + b">")
    print(f"     RCPT without AUTH: {r!r}")
    check(r.startswith(b"554 5.7.1"), "unauthenticated RCPT is refused (554 5.7.1)")
    c.cmd(b"RSET")
    r = c.cmd(b"AUTH XOAUTH2 " + xoauth2(sender, "not-a-token"))
    print(f"     AUTH XOAUTH2 bad token: {r!r} = {base64.b64decode(r[4:])!r}")
    check(r.startswith(b"334 ") and b'"status":"401"' in base64.b64decode(r[4:]), "bad token: 334 <b64 JSON>")
    r = c.cmd(b"")
    print(f"     ... then: {r!r}")
    check(r.startswith(b"535 5.7.8 "), "bad token: 535 5.7.8 after the empty response")
    r = c.cmd(b"AUTH XOAUTH2 " + xoauth2(rcpt, t_sender))
    r2 = c.cmd(b"")
    check(r.startswith(b"334 ") and r2.startswith(b"535 5.7.8 "), "another user's token: 334, then 535 5.7.8")
    r = c.cmd(b"AUTH XOAUTH2 " + xoauth2(sender, t_sender))
    print(f"     AUTH XOAUTH2 (after 2 failures): {r!r}")
    check(r == b"235 2.7.0 Authentication successful\r\n", "STARTTLS + AUTH XOAUTH2: 235 2.7.0")
    c.close()

    # ---- SMTPS_PORT ----
    c, r = h.login(env["SMTPS_PORT"], sender, t_sender, tls=True, mech=b"OAUTHBEARER")
    print(f"     SMTPS AUTH OAUTHBEARER: {r!r}")
    check(r == b"235 2.7.0 Authentication successful\r\n", "SMTPS + AUTH OAUTHBEARER: 235 2.7.0")
    c.close()
    c, r = h.login(env["SMTPS_PORT"], sender, t_sender, tls=True)
    print(f"     SMTPS AUTH XOAUTH2: {r!r}")
    check(r == b"235 2.7.0 Authentication successful\r\n", "SMTPS + AUTH XOAUTH2: 235 2.7.0")
    c.close()

    # ---- messages ----
    s_b, r_b = sender.encode(), rcpt.encode()
    sent = {}
    # 8-bit body, declared BODY=8BITMIME; a line starting with "." and a 3000-byte line.
    m1 = message(f"<8bit-{run}@example.test>".encode(), s_b, r_b, b"8bit body",
                 "Grüße aus Köln – 8 bit ✓\r\n.leading dot\r\n..two dots\r\n".encode() + b"x" * 3000 + b"\r\nend\r\n",
                 b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n")
    c, r = h.login(env["SMTP_PORT"], sender, t_sender)
    r1 = c.cmd(b"MAIL FROM:<" + s_b + b"> BODY=8BITMIME")
    r2 = c.cmd(b"RCPT TO:<" + r_b + b">") + c.cmd(b"RCPT TO:<" + rcpt2.encode() + b">")
    r3 = c.data(m1)
    print(f"     8BITMIME, 2 recipients: {r1!r} {r2!r} {r3!r}")
    check(r3.startswith(b"250 2.0.0 Ok: queued as "), "8BITMIME message for 2 recipients accepted (250 2.0.0)")
    sent["8bit"] = (rcpt, t_rcpt, f"<8bit-{run}@example.test>", m1)
    sent["8bit, 2nd recipient"] = (rcpt2, t_rcpt2, f"<8bit-{run}@example.test>", m1)
    # SMTPUTF8: UTF-8 in From/To/Subject (not encoded words).
    m2 = message(f"<utf8-{run}@example.test>".encode(), "Jürgen Ölmann <".encode() + s_b + b">",
                 "Zoë <".encode() + r_b + b">", "Grüße ✓ SMTPUTF8 日本語".encode(), "Body ✓\r\n".encode(),
                 b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n")
    r1 = c.cmd(b"MAIL FROM:<" + s_b + b"> SMTPUTF8 BODY=8BITMIME")
    r2 = c.cmd(b"RCPT TO:<" + r_b + b">")
    r3 = c.data(m2)
    print(f"     SMTPUTF8: {r1!r} {r2!r} {r3!r}")
    check(r3.startswith(b"250 2.0.0 "), "SMTPUTF8 message accepted")
    sent["smtputf8"] = (rcpt, t_rcpt, f"<utf8-{run}@example.test>", m2)
    # BDAT in two chunks (pipelined MAIL/RCPT/BDAT).
    m3 = message(f"<bdat-{run}@example.test>".encode(), s_b, r_b, b"BDAT", b"first part\r\nsecond part\r\n")
    cut = len(m3) // 2
    c.sock.sendall(b"MAIL FROM:<" + s_b + b">\r\nRCPT TO:<" + r_b + b">\r\nBDAT " + str(cut).encode() + b"\r\n" +
                   m3[:cut])
    rs = [c.reply(), c.reply(), c.reply()]
    c.sock.sendall(b"BDAT " + str(len(m3) - cut).encode() + b" LAST\r\n" + m3[cut:])
    rs.append(c.reply())
    print(f"     BDAT: {rs!r}")
    check(rs[2].startswith(b"250 2.0.0 ") and re.match(rb"250 2\.0\.0 Ok: \d+ bytes queued as ", rs[3]),
          "BDAT n + BDAT m LAST accepted")
    sent["bdat"] = (rcpt, t_rcpt, f"<bdat-{run}@example.test>", m3)
    c.close()
    # 10 MB over SMTPS to a second new address.
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\r\n"
    m4 = message(f"<big-{run}@example.test>".encode(), s_b, rcpt2.encode(), b"10 MB",
                 line * (10 * 1024 * 1024 // len(line) + 1))
    c, r = h.login(env["SMTPS_PORT"], sender, t_sender, tls=True)
    r1 = c.cmd(b"MAIL FROM:<" + s_b + b"> SIZE=" + str(len(m4)).encode())
    r2 = c.cmd(b"RCPT TO:<" + rcpt2.encode() + b">")
    t0 = time.monotonic()
    r3 = c.data(m4)
    print(f"     10 MB ({len(m4)} bytes): {r1!r} {r2!r} {r3!r} in {time.monotonic() - t0:.2f}s")
    check(r3.startswith(b"250 2.0.0 "), f"a {len(m4)}-byte message is accepted")
    sent["10mb"] = (rcpt2, t_rcpt2, f"<big-{run}@example.test>", m4)
    r1 = c.cmd(b"MAIL FROM:<" + s_b + b"> SIZE=" + str(env["SMTP_MAX_SIZE"] + 1).encode())
    print(f"     MAIL SIZE=limit+1: {r1!r}")
    check(r1.startswith(b"552 5.3.4 "), "MAIL FROM SIZE above the limit: 552 5.3.4")
    c.close()

    # ---- read back over IMAPS as the recipients ----
    for name, (user, tok, msgid, msg) in sent.items():
        body = h.imap_fetch(user, tok, msgid)
        ok = trace_then(body, msg)
        if not ok and body is not None:
            print(f"     got {len(body)} bytes; head: {body[:600]!r}")
        check(ok, f"{name}: IMAP BODY[] as {user} = 3 trace headers + the sent bytes, byte for byte")
        check(f"\r\nDelivered-To: {user}\r\n".encode() in body[: len(body) - len(msg)] and
              body.startswith(f"Return-Path: <{sender}>\r\n".encode()),
              f"{name}: Return-Path = the envelope sender, Delivered-To = {user}")
        if name == "8bit":
            print("     trace headers: " + repr(body[: len(body) - len(msg)]))

    # ---- relay-mta through a fake smarthost (AUTH PLAIN) ----
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    sctx.load_cert_chain(os.path.join(d, "server.pem"), os.path.join(d, "server.key"))
    for mode in ("starttls", "implicit"):
        fake = FakeSmarthost(sctx, mode == "implicit", "relay-user@example.test", "pa ss:wörd")
        t0 = time.monotonic()
        rl = relay_mta(d, str(fake.port), "relay-user@example.test", "pa ss:wörd", f"--tls={mode}")
        check(rl is not None, f"relay-mta ({mode}) started in {time.monotonic() - t0:.2f}s: {rl}")
        c = Smtp(rl["RELAY_SMTP_PORT"], h.ctx)
        r, caps = c.ehlo()
        mr = message(f"<relay-{mode}-{run}@example.test>".encode(), s_b, b"x@elsewhere.test", b"relayed",
                     "8-bit ✓ body\r\n.dot line\r\n".encode(), b"Content-Type: text/plain; charset=utf-8\r\n")
        r1 = c.cmd(b"MAIL FROM:<" + s_b + b"> BODY=8BITMIME")
        r2 = c.cmd(b"RCPT TO:<x@elsewhere.test>")
        r3 = c.data(mr)
        c.close()
        print(f"     relay accepts: {r1!r} {r2!r} {r3!r}")
        check(r3.startswith(b"250 2.0.0 "), f"relay ({mode}) accepts a message without AUTH")
        check(fake.event.wait(20), f"fake smarthost ({mode}) received the relayed message")
        authed, mail, rcpts, data = fake.received[0]
        print(f"     smarthost saw: AUTH {fake.auth_lines[0][:11]!r}... as {authed}, {mail!r}, {rcpts!r}")
        check(authed == ("relay-user@example.test", "pa ss:wörd"), "relay logged in with AUTH PLAIN USER/PASSWORD")
        check(mail.startswith(b"MAIL FROM:<" + s_b + b">") and rcpts == [b"RCPT TO:<x@elsewhere.test>"],
              "relayed envelope = the submitted envelope")
        check(data.endswith(mr) and data[: len(data) - len(mr)].startswith(b"Received: "),
              "relayed bytes = one Received header + the submitted bytes")
        line = wait_log(rl["RELAY_LOG"], rb"[^\n]*status=sent[^\n]*")
        print(f"     relay log: {line}")
        tls_line = wait_log(rl["RELAY_LOG"], rb"[^\n]*TLS connection established[^\n]*")
        check(tls_line is not None and "Trusted TLS" in tls_line, f"relay used TLS ({mode}), cert trusted via CA")
        relay_stop(d, rl["RELAY_SMTP_PORT"])
        fake.close()

    # ---- relay-mta through the real upstream: it has no PLAIN, so the attempt is deferred ----
    rl = relay_mta(d, str(env["SMTP_PORT"]), sender, "x")
    c = Smtp(rl["RELAY_SMTP_PORT"], h.ctx)
    c.ehlo()
    c.cmd(b"MAIL FROM:<" + s_b + b">")
    c.cmd(b"RCPT TO:<" + r_b + b">")
    r3 = c.data(message(f"<relay-up-{run}@example.test>".encode(), s_b, r_b, b"deferred", b"x\r\n"))
    c.close()
    line = wait_log(rl["RELAY_LOG"], rb"[^\n]*status=deferred[^\n]*")
    print(f"     relay log: {line}")
    check(line is not None and f"relay=127.0.0.1[127.0.0.1]:{env['SMTP_PORT']}" in line,
          "relay to the upstream: attempt logged as deferred (no PLAIN there)")
    q = subprocess.run(["postqueue", "-c", rl["RELAY_CONFIG_DIR"], "-j"], capture_output=True, text=True).stdout
    check(len(q.splitlines()) == 1 and json.loads(q)["recipients"][0]["address"] == rcpt,
          "postqueue -c RELAY_CONFIG_DIR -j lists the deferred message")
    relay_stop(d, rl["RELAY_SMTP_PORT"])
    print("smtpcheck: all checks passed")


if __name__ == "__main__":
    main()
