#!/usr/bin/env python3
"""Check a running harness end to end (Python 3 stdlib only).

Usage: selftest.py DIR [--concurrency N]   (DIR as given to `start`)
Checks: authorization-code flow, IMAPS / IMAP+STARTTLS / POP3S / POP3+STLS
logins with XOAUTH2 and OAUTHBEARER, mailbox contents equal the seed files
byte for byte, refresh-token rotation, client_credentials (app@example.test),
5-second mailgate-short tokens expiring, revoked tokens rejected, a refused
authorization (deny@example.test), no auth penalty after failed logins,
loopback redirect URIs on any port and path (authorize.py --redirect-uri and
--url), the device flow completed by device.py, private_key_jwt client
authentication (mailgate-jwt), the JWT bearer grant of the service account,
and N concurrent sessions. Prints the raw bytes Dovecot sends when it rejects
a token. Seeds app@example.test (via ./seed) if needed. Exits non-zero on
failure. Signs JWTs with the `openssl` command.
"""
import argparse
import base64
import concurrent.futures
import glob
import hashlib
import imaplib
import json
import os
import poplib
import secrets
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
PASSED = []


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    PASSED.append(what)
    print(f"ok   {what}")


def xoauth2(user, token):
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearer(user, token):
    return f"n,a={user},\x01auth=Bearer {token}\x01\x01".encode()


def b64u(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_rs256(header, claims, key_pem):
    """Compact JWS, RS256, signed with `openssl dgst -sha256 -sign` (key_pem: PEM text)."""
    signing_input = f"{b64u(json.dumps(header).encode())}.{b64u(json.dumps(claims).encode())}"
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as f:
        f.write(key_pem)
        f.flush()
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", f.name], input=signing_input.encode(),
                             capture_output=True, check=True).stdout
    return f"{signing_input}.{b64u(sig)}"


class Harness:
    def __init__(self, d):
        with open(os.path.join(d, "harness.json")) as f:
            self.env = json.load(f)
        self.dir = d
        self.ctx = ssl.create_default_context(cafile=self.env["CA_FILE"])
        self.seeds = [open(p, "rb").read() for p in sorted(glob.glob(os.path.join(self.env["SEED_DIR"], "*.eml")))]

    # ---- OAuth ----
    def post(self, url, form, client=None, secret=None):
        """POST a form, with client_secret_basic if client is given."""
        headers = {}
        if client:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{client}:{secret}".encode()).decode()
        req = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(), method="POST",
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=15) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else {})
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def authorize(self, user, client="mailgate-test", secret="mailgate-test-secret", extra=()):
        p = subprocess.run([sys.executable, os.path.join(HERE, "authorize.py"), "--issuer", self.env["OAUTH_ISSUER"],
                            "--client-id", client, "--client-secret", secret, "--user", user, *extra],
                           capture_output=True, text=True, timeout=60)
        return p.returncode, (json.loads(p.stdout) if p.returncode == 0 else p.stderr.strip())

    def script(self, name, *args):
        p = subprocess.run([sys.executable, os.path.join(HERE, name), *args], capture_output=True, text=True,
                           timeout=60)
        return p.returncode, p.stdout.strip(), p.stderr.strip()

    # ---- IMAP ----
    def imaps(self):
        return imaplib.IMAP4_SSL("127.0.0.1", self.env["IMAPS_PORT"], ssl_context=self.ctx, timeout=30)

    def imap_login(self, user, token, conn=None, mech="XOAUTH2"):
        c = conn or self.imaps()
        fn = xoauth2 if mech == "XOAUTH2" else oauthbearer
        try:
            c.authenticate(mech, lambda _: fn(user, token))
            return c
        except imaplib.IMAP4.error:
            c.shutdown()
            return None

    def raw_imap_reject(self, token, user="alice@example.test", mech="XOAUTH2", sasl_ir=True):
        """Raw bytes of a rejected AUTHENTICATE on the plain IMAP port."""
        fn = xoauth2 if mech == "XOAUTH2" else oauthbearer
        ir = base64.b64encode(fn(user, token))
        with socket.create_connection(("127.0.0.1", self.env["IMAP_PORT"]), timeout=15) as s:
            f = s.makefile("rb")
            f.readline()
            got = []
            if sasl_ir:
                s.sendall(b"a1 AUTHENTICATE " + mech.encode() + b" " + ir + b"\r\n")
            else:
                s.sendall(b"a1 AUTHENTICATE " + mech.encode() + b"\r\n")
                got.append(f.readline())
                s.sendall(ir + b"\r\n")
            got.append(f.readline())
            if got[-1].startswith(b"+"):
                s.sendall(b"\r\n")
                got.append(f.readline())
            return got

    # ---- POP3 ----
    def pop_auth(self, p, user, token, mech="XOAUTH2"):
        fn = xoauth2 if mech == "XOAUTH2" else oauthbearer
        try:
            r = p._shortcmd(f"AUTH {mech}")
            if not r.startswith(b"+"):
                return False
            r = p._shortcmd(base64.b64encode(fn(user, token)).decode())
            if r.startswith(b"+OK"):
                return True
            p._shortcmd("")  # "+ <error JSON>" challenge: answer empty, expect -ERR
            return False
        except poplib.error_proto:
            return False

    def raw_pop_reject(self, token, user="alice@example.test", sasl_ir=True):
        ir = base64.b64encode(xoauth2(user, token))
        with socket.create_connection(("127.0.0.1", self.env["POP3_PORT"]), timeout=15) as s:
            f = s.makefile("rb")
            f.readline()
            got = []
            if sasl_ir:
                s.sendall(b"AUTH XOAUTH2 " + ir + b"\r\n")
            else:
                s.sendall(b"AUTH XOAUTH2\r\n")
                got.append(f.readline())
                s.sendall(ir + b"\r\n")
            got.append(f.readline())
            if got[-1].startswith(b"+ "):
                s.sendall(b"\r\n")
                got.append(f.readline())
            return got

    def pop3s_retr_raw(self, user, token):
        """Log in over POP3S on a raw socket; return [(raw_retr_bytes, unstuffed)]."""
        with socket.create_connection(("127.0.0.1", self.env["POP3S_PORT"]), timeout=30) as raw:
            s = self.ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            f = s.makefile("rb")
            assert f.readline().startswith(b"+OK")
            s.sendall(b"AUTH XOAUTH2\r\n")
            assert f.readline().startswith(b"+")
            s.sendall(base64.b64encode(xoauth2(user, token)) + b"\r\n")
            line = f.readline()
            if not line.startswith(b"+OK"):
                return None
            s.sendall(b"STAT\r\n")
            n = int(f.readline().split()[1])
            out = []
            for i in range(1, n + 1):
                s.sendall(b"RETR %d\r\n" % i)
                assert f.readline().startswith(b"+OK")
                raw_lines = []
                while True:
                    ln = f.readline()
                    if ln == b".\r\n":
                        break
                    raw_lines.append(ln)
                unstuffed = b"".join(ln[1:] if ln.startswith(b".") else ln for ln in raw_lines)
                out.append((b"".join(raw_lines), unstuffed))
            s.sendall(b"QUIT\r\n")
            f.readline()
            return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--concurrency", type=int, default=200)
    args = ap.parse_args()
    h = Harness(args.dir)
    E = h.env
    n_seed = E["SEED_COUNT"]
    check(len(h.seeds) == n_seed, f"{n_seed} seed files in SEED_DIR")

    # Authorization code flow.
    rc, tok = h.authorize("alice@example.test")
    check(rc == 0 and tok["token_type"] == "Bearer" and "refresh_token" in tok, "authorize.py alice (code+PKCE)")
    at = tok["access_token"]
    rc, err = h.authorize("deny@example.test")
    check(rc != 0 and "access_denied" in err, "deny@example.test is refused with access_denied")

    # IMAPS + XOAUTH2, contents.
    c = h.imap_login("alice@example.test", at)
    check(c is not None, "IMAPS XOAUTH2 login alice")
    typ, data = c.select("INBOX")
    check(typ == "OK" and int(data[0]) == n_seed, f"INBOX has {n_seed} messages")
    for i, seed in enumerate(h.seeds, 1):
        typ, data = c.fetch(str(i), "(BODY.PEEK[])")
        check(typ == "OK" and data[0][1] == seed, f"IMAP FETCH {i} BODY[] == seed file {i} ({len(seed)} bytes)")
    c.logout()

    # IMAP + STARTTLS, OAUTHBEARER.
    c = imaplib.IMAP4("127.0.0.1", E["IMAP_PORT"], timeout=30)
    c.starttls(ssl_context=h.ctx)
    c = h.imap_login("alice@example.test", at, conn=c, mech="OAUTHBEARER")
    check(c is not None, "IMAP STARTTLS + OAUTHBEARER login alice")
    check(int(c.select("INBOX", readonly=True)[1][0]) == n_seed, "STARTTLS session sees the seed messages")
    c.logout()

    # POP3S raw: dot-stuffing and bytes.
    msgs = h.pop3s_retr_raw("alice@example.test", at)
    check(msgs is not None and len(msgs) == n_seed, "POP3S XOAUTH2 login alice, STAT = seed count")
    for i, (raw, unstuffed) in enumerate(msgs, 1):
        check(unstuffed == h.seeds[i - 1], f"POP3 RETR {i} (dot-unstuffed) == seed file {i}")
    dots = msgs[5][0]
    check(b"\r\n..\r\n" in dots and b"\r\n...leading dot" not in dots and b"\r\n..leading dot" in dots,
          "POP3 dot-stuffs lines starting with '.'")

    # POP3 + STLS with poplib.
    p = poplib.POP3("127.0.0.1", E["POP3_PORT"], timeout=30)
    p.stls(context=h.ctx)
    check(h.pop_auth(p, "alice@example.test", at), "POP3 STLS + XOAUTH2 login alice")
    check(p.stat()[0] == n_seed, "POP3 STLS session STAT = seed count")
    uidls = [ln.split()[1] for ln in p.uidl()[1]]
    check(len(set(uidls)) == n_seed and all(len(u) == 16 for u in uidls),
          f"POP3 UIDL is %08Xu%08Xv (e.g. {uidls[0].decode()})")
    p.quit()

    # Wrong user for the token.
    check(h.imap_login("bob@example.test", at) is None, "alice's token does not log in bob")

    # Rejection bytes (IMAP and POP3), for the gateway's parser.
    bad = "not-a-valid-token"
    print("\n--- raw Dovecot rejections (bad token) ---")
    for label, got in [
        ("IMAP XOAUTH2 SASL-IR", h.raw_imap_reject(bad)),
        ("IMAP XOAUTH2 no SASL-IR", h.raw_imap_reject(bad, sasl_ir=False)),
        ("IMAP OAUTHBEARER SASL-IR", h.raw_imap_reject(bad, mech="OAUTHBEARER")),
        ("POP3 XOAUTH2 SASL-IR", h.raw_pop_reject(bad)),
        ("POP3 XOAUTH2 no SASL-IR", h.raw_pop_reject(bad, sasl_ir=False)),
    ]:
        print(f"{label}:")
        for line in got:
            print(f"  S: {line!r}")
            if line.startswith(b"+ ") and len(line) > 4:
                print(f"     decoded: {base64.b64decode(line[2:].strip()).decode()}")
    print("---\n")
    got = h.raw_imap_reject(bad)
    check(got[0].startswith(b"+ ") and got[-1].startswith(b"a1 NO "), "IMAP rejection is '+ <b64 json>' then tagged NO")
    reject_bytes = got
    check(h.raw_imap_reject(at, user="bob@example.test") == reject_bytes,
          "wrong-user rejection sends the same bytes as a bad token")
    got = h.raw_pop_reject(bad)
    check(got[0].startswith(b"+ ") and got[-1].startswith(b"-ERR"), "POP3 rejection is '+ <b64 json>' then -ERR")

    # No auth penalty: 5 failures, then a good login must be fast.
    for _ in range(5):
        h.raw_imap_reject(bad)
    t0 = time.monotonic()
    c = h.imap_login("alice@example.test", at)
    dt = time.monotonic() - t0
    check(c is not None and dt < 1.0, f"good login right after 5 failures takes {dt:.3f}s (< 1s)")
    c.logout()

    # Refresh token rotation.
    st, r1 = h.post(E["OAUTH_TOKEN_URL"], {"grant_type": "refresh_token", "refresh_token": tok["refresh_token"]},
                    "mailgate-test", "mailgate-test-secret")
    check(st == 200 and r1["refresh_token"] != tok["refresh_token"], "refresh_token grant rotates the refresh token")
    c = h.imap_login("alice@example.test", r1["access_token"])
    check(c is not None, "refreshed access token logs in")
    c.logout()
    st, r2 = h.post(E["OAUTH_TOKEN_URL"], {"grant_type": "refresh_token", "refresh_token": r1["refresh_token"]},
                    "mailgate-test", "mailgate-test-secret")
    check(st == 200 and "refresh_token" in r2, "rotated refresh token works once more")
    st, r3 = h.post(E["OAUTH_TOKEN_URL"], {"grant_type": "refresh_token", "refresh_token": tok["refresh_token"]},
                    "mailgate-test", "mailgate-test-secret")
    check(st == 400 and r3.get("error") == "invalid_grant", "the used (rotated-out) refresh token is invalid_grant")
    # oidc-provider treats reuse of a rotated-out refresh token as theft and
    # revokes the whole grant: the tokens issued after it die too.
    check(h.imap_login("alice@example.test", r2["access_token"]) is None,
          "refresh-token reuse revoked the grant (newest access token rejected)")
    st, r4 = h.post(E["OAUTH_TOKEN_URL"], {"grant_type": "refresh_token", "refresh_token": r2["refresh_token"]},
                    "mailgate-test", "mailgate-test-secret")
    check(st == 400 and r4.get("error") == "invalid_grant", "... and the newest refresh token too")

    # client_credentials -> app@example.test
    if not os.path.isdir(os.path.join(args.dir, "mail", "app@example.test")):
        subprocess.run([os.path.join(HERE, "seed"), args.dir, "app@example.test"], check=True)
    st, cc = h.post(E["OAUTH_TOKEN_URL"], {"grant_type": "client_credentials", "scope": "mail"},
                    "mailgate-test", "mailgate-test-secret")
    check(st == 200 and cc["expires_in"] == 3600, "client_credentials token for mailgate-test")
    c = h.imap_login("app@example.test", cc["access_token"])
    check(c is not None and int(c.select("INBOX")[1][0]) == n_seed, "client_credentials token logs in as app@example.test")
    c.logout()
    check(h.imap_login("alice@example.test", cc["access_token"]) is None, "client_credentials token does not log in alice")

    # Revocation.
    rc, t2 = h.authorize("alice@example.test")
    c = h.imap_login("alice@example.test", t2["access_token"])
    check(c is not None, "fresh token works before revocation")
    c.logout()
    st, _ = h.post(E["OAUTH_REVOCATION_URL"], {"token": t2["access_token"], "token_type_hint": "access_token"},
                   "mailgate-test", "mailgate-test-secret")
    check(st == 200, "revocation endpoint accepts the access token")
    check(h.imap_login("alice@example.test", t2["access_token"]) is None, "revoked access token is rejected by Dovecot")
    check(h.raw_imap_reject(t2["access_token"]) == reject_bytes, "revoked-token rejection sends the same bytes")

    # Short-lived tokens (mailgate-short: 5 s).
    rc, ts = h.authorize("alice@example.test", "mailgate-short", "mailgate-short-secret")
    check(rc == 0 and ts["expires_in"] == 5, "mailgate-short access token has expires_in 5")
    st, cs = h.post(E["OAUTH_TOKEN_URL"], {"grant_type": "client_credentials"}, "mailgate-short", "mailgate-short-secret")
    check(st == 200 and cs["expires_in"] == 5, "mailgate-short client_credentials token has expires_in 5")
    c = h.imap_login("alice@example.test", ts["access_token"])
    check(c is not None, "mailgate-short token works at once")
    c.logout()
    p = poplib.POP3_SSL("127.0.0.1", E["POP3S_PORT"], context=h.ctx, timeout=30)
    check(h.pop_auth(p, "app@example.test", cs["access_token"]), "mailgate-short client_credentials token works on POP3S")
    p.quit()
    time.sleep(6.5)
    check(h.imap_login("alice@example.test", ts["access_token"]) is None, "mailgate-short token rejected after 6.5 s (IMAP)")
    check(h.raw_imap_reject(ts["access_token"]) == reject_bytes, "expired-token rejection sends the same bytes")
    p = poplib.POP3_SSL("127.0.0.1", E["POP3S_PORT"], context=h.ctx, timeout=30)
    check(not h.pop_auth(p, "app@example.test", cs["access_token"]), "expired client_credentials token rejected (POP3S)")
    p.close()
    st, rs = h.post(E["OAUTH_TOKEN_URL"], {"grant_type": "refresh_token", "refresh_token": ts["refresh_token"]},
                    "mailgate-short", "mailgate-short-secret")
    c = h.imap_login("alice@example.test", rs.get("access_token", ""))
    check(st == 200 and c is not None, "expired mailgate-short session recovers via refresh_token")
    c.logout()

    # Device authorization endpoint answers.
    st, dv = h.post(E["OAUTH_DEVICE_URL"], {"scope": "openid mail", "login_hint": "alice@example.test"},
                    "mailgate-test", "mailgate-test-secret")
    check(st == 200 and "device_code" in dv and "user_code" in dv, "device authorization endpoint issues codes")

    # Loopback redirect URIs: any port, any path, 127.0.0.1 or localhost.
    for ru in ("http://127.0.0.1:45678/oauth2/callback/gmail-3fa9c1", "http://localhost:8080/oauth2/callback/x-1"):
        rc, t = h.authorize("alice@example.test", extra=("--redirect-uri", ru))
        check(rc == 0 and "access_token" in t, f"authorize.py --redirect-uri {ru}")
    verifier = secrets.token_urlsafe(32)
    ru = "http://127.0.0.1:41999/oauth2/callback/test-0a1b2c"
    auth_url = E["OAUTH_AUTH_URL"] + "?" + urllib.parse.urlencode({
        "response_type": "code", "client_id": "mailgate-test", "redirect_uri": ru, "state": "st-1",
        "scope": "openid offline_access mail", "code_challenge_method": "S256",
        "code_challenge": b64u(hashlib.sha256(verifier.encode()).digest())})
    rc, out, err = h.script("authorize.py", "--url", auth_url, "--user", "bob@example.test")
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(out).query))
    check(rc == 0 and out.startswith(ru + "?") and q.get("state") == "st-1" and "code" in q,
          "authorize.py --url prints the redirect to the URL's redirect_uri (code, state)")
    st, t = h.post(E["OAUTH_TOKEN_URL"], {"grant_type": "authorization_code", "code": q.get("code"),
                                          "redirect_uri": ru, "code_verifier": verifier},
                   "mailgate-test", "mailgate-test-secret")
    c = h.imap_login("bob@example.test", t.get("access_token", ""))
    check(st == 200 and c is not None, "... and its code redeems to a token that logs in bob")
    c.logout()
    rc, out, err = h.script("authorize.py", "--url", auth_url.replace("127.0.0.1%3A41999", "example.com"),
                            "--user", "bob@example.test")
    check(rc == 1 and "invalid_redirect_uri" in err, "a non-loopback redirect_uri is refused (invalid_redirect_uri)")

    # Device flow completed by device.py (no login_hint in the request).
    st, dv = h.post(E["OAUTH_DEVICE_URL"], {"scope": "openid offline_access mail"},
                    "mailgate-test", "mailgate-test-secret")
    poll = {"grant_type": "urn:ietf:params:oauth:grant-type:device_code", "device_code": dv["device_code"]}
    polls = [h.post(E["OAUTH_TOKEN_URL"], poll, "mailgate-test", "mailgate-test-secret") for _ in range(3)]
    check(all(st == 400 and r.get("error") == "authorization_pending" for st, r in polls),
          "3 immediate device polls: authorization_pending each (oidc-provider never sends slow_down)")
    rc, out, err = h.script("device.py", "--issuer", E["OAUTH_ISSUER"], "--user-code", dv["user_code"],
                            "--user", "bob@example.test")
    check(rc == 0, f"device.py approves user code {dv['user_code']} as bob")
    st, dt = h.post(E["OAUTH_TOKEN_URL"], poll, "mailgate-test", "mailgate-test-secret")
    check(st == 200 and "refresh_token" in dt, "device poll after device.py returns access + refresh tokens")
    c = h.imap_login("bob@example.test", dt["access_token"])
    check(c is not None, "device-flow access token logs in bob")
    c.logout()

    # private_key_jwt client mailgate-jwt: client_credentials -> app@example.test.
    der = ssl.PEM_cert_to_DER_cert(open(E["CLIENT_JWT_CERT"]).read())

    def client_assertion(aud):
        now = int(time.time())
        return jwt_rs256({"alg": "RS256", "typ": "JWT", "x5t#S256": b64u(hashlib.sha256(der).digest())},
                         {"iss": E["CLIENT_JWT_ID"], "sub": E["CLIENT_JWT_ID"], "aud": aud, "jti": secrets.token_hex(16),
                          "nbf": now, "iat": now, "exp": now + 300}, open(E["CLIENT_JWT_KEY"]).read())

    cat = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    for aud in (E["OAUTH_TOKEN_URL"], E["OAUTH_ISSUER"]):
        a = client_assertion(aud)
        st, cj = h.post(E["OAUTH_TOKEN_URL"], {"grant_type": "client_credentials", "scope": "mail",
                                               "client_assertion_type": cat, "client_assertion": a})
        c = h.imap_login("app@example.test", cj.get("access_token", ""))
        check(st == 200 and c is not None, f"private_key_jwt (aud {aud}) token logs in as app@example.test")
        c.logout()
    st, r = h.post(E["OAUTH_TOKEN_URL"], {"grant_type": "client_credentials", "client_assertion_type": cat,
                                          "client_assertion": a})
    check(st == 401 and r.get("error") == "invalid_client", "a replayed client assertion (same jti) is invalid_client")

    # JWT bearer grant (Google-style service account), no client authentication.
    sa = json.load(open(E["SERVICE_ACCOUNT_JSON"]))
    now = int(time.time())
    a = jwt_rs256({"alg": "RS256", "typ": "JWT", "kid": sa["private_key_id"]},
                  {"iss": sa["client_email"], "sub": "alice@example.test", "scope": "mail", "aud": sa["token_uri"],
                   "iat": now, "exp": now + 3600}, sa["private_key"])
    st, sj = h.post(sa["token_uri"], {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": a})
    check(st == 200 and sj.get("expires_in") == 3600 and "refresh_token" not in sj, "JWT bearer grant issues a 1 h token")
    c = h.imap_login("alice@example.test", sj["access_token"])
    check(c is not None, "JWT bearer token logs in as sub (alice)")
    c.logout()
    head, body, _ = a.split(".")
    st, r = h.post(sa["token_uri"], {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                                     "assertion": f"{head}.{body}.{b64u(bytes(256))}"})
    check(st == 400 and r.get("error") == "invalid_grant", "JWT bearer assertion with a bad signature: invalid_grant")

    # Concurrency: N simultaneous logged-in IMAPS sessions.
    if args.concurrency:
        n = args.concurrency
        conns = []

        rc, tc = h.authorize("bob@example.test")

        def one(_):
            return h.imap_login("bob@example.test", tc["access_token"])

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(n, 64)) as ex:
            conns = list(ex.map(one, range(n)))
        ok = [c for c in conns if c is not None]
        dt = time.monotonic() - t0
        alive = sum(1 for c in ok if c.noop()[0] == "OK")
        for c in ok:
            try:
                c.logout()
            except Exception:  # noqa: BLE001
                pass
        check(alive == n, f"{n} concurrent IMAPS sessions logged in and alive ({dt:.1f}s)")

    print(f"\n{len(PASSED)} passed, 0 failed")


if __name__ == "__main__":
    main()
